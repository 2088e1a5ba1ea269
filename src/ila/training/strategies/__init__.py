"""Training strategies of `ila train`: one file each behind `base.Strategy`, found through `base.strategies()`."""

from ila.training.strategies.base import Context, Plan, Strategy, get_strategy, register, strategies

__all__ = ["Context", "Plan", "Strategy", "get_strategy", "register", "strategies"]
