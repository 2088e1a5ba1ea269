"""lisa: Layerwise Importance Sampled AdamW (seeds/002, LISA Alg. 1), full-parameter.

Every `interval` steps, γ = `layers` decoder blocks are sampled and only they train, with the embeddings, the
final norm and the LM head (unless `train_embeddings: false`); Alg. 1's probabilities are {1, γ/N_L, …, γ/N_L, 1}.

Memory is really freed: at each switch the AdamW state of the blocks that stop training is deleted and their
gradients dropped (`requires_grad=False`), and blocks that start training begin with fresh state (AdamW creates
it at their first step). So the optimizer holds state for the active parameters only, and peak memory falls
with γ. Keeping the state of inactive blocks (as trainers that only flip `requires_grad` do) grows memory with
every switch; restarting it is the documented choice here.

Every block's parameters are in the optimizer from the start (they all require gradients when the Trainer builds
it, and the first switch happens after), so a block first sampled late still updates. A block outside the
active set gets no gradient, so AdamW skips it (no step, no weight decay): it stays bit-identical.

Sampling (`sampling`): `uniform` (LISA); `ranking` — block b drawn with probability proportional to its rank
among the blocks of a `--ranking` (1 for the least important, N_L for the most; `Ranking.by_block`), so any
importance method steers LISA; `cyclic` — γ consecutive blocks at a time, walking up the stack (LIFT).
The draw of interval k depends only on (seed, k), so a resumed run continues the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ila.distributed import refuse_distributed
from ila.errors import IlaError
from ila.io import read_json, write_json_atomic
from ila.options import one_of, option, positive
from ila.training.strategies.base import Context, Plan, Strategy, check_method, no_rankings, register

SCHEDULE_FILE = "lisa_schedule.json"  # beside each Trainer checkpoint


@dataclass
class LisaOptions:
    """LISA's schedule."""

    layers: int = option(2, "γ: decoder blocks that train at a time", check=positive, flag="--lisa-layers")
    interval: int = option(20, "steps between two samplings of the active blocks", check=positive,
                           flag="--lisa-interval")
    sampling: str = option("uniform", "how blocks are drawn: uniform (LISA), ranking (proportional to the block's "
                           "rank in --ranking) or cyclic (γ consecutive blocks at a time)",
                           check=one_of("uniform", "ranking", "cyclic"), flag="--lisa-sampling")
    train_embeddings: bool = option(True, "embeddings, final norm and LM head train throughout (LISA); false "
                                    "freezes them", flag="--lisa-train-embeddings")


def check(config: Any, options: LisaOptions) -> None:
    check_method(config, STRATEGY)
    refuse_distributed("strategy lisa", "it changes which blocks train every interval, and FSDP and DeepSpeed keep "
                       "parameters or optimizer state in flat shards that cannot be frozen or freed block by "
                       "block", engines=True)
    if options.sampling != "ranking":
        no_rankings(config, "lisa without lisa.sampling: ranking")


def needs_ranking(config: Any, options: LisaOptions) -> bool:
    return options.sampling == "ranking"


def block_weights(ranking, n_blocks: int) -> list[float]:
    """Sampling weight of each block: its rank among the blocks of `ranking` (1 = least important)."""
    from ila.ranking import average_ranks

    blocks = ranking.by_block()
    ranks = average_ranks([e.score for e in blocks.entries])
    weights = dict(zip([e.layer.block for e in blocks.entries], ranks, strict=True))
    return [weights[b] for b in range(n_blocks)]


def active_blocks(options: LisaOptions, n_blocks: int, interval_index: int, seed: int,
                  weights: list[float] | None = None) -> list[int]:
    """The blocks that train in interval `interval_index` (sorted)."""
    import numpy as np

    gamma = options.layers
    if options.sampling == "cyclic":
        return sorted({(interval_index * gamma + i) % n_blocks for i in range(gamma)})
    rng = np.random.default_rng([seed, interval_index])
    p = None if weights is None else np.asarray(weights, dtype=float) / sum(weights)
    return sorted(int(b) for b in rng.choice(n_blocks, size=gamma, replace=False, p=p))


def state_bytes(optimizer) -> int:
    """Bytes of tensors in the optimizer's state."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    return sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values() if hasattr(v, "numel"))


def prepare(context: Context) -> Plan:
    from transformers import TrainerCallback

    from ila.layers import base_model_of, find_blocks
    from ila.selection import Selection, check_matches

    config, options = context.config, context.options
    model = context.model
    _, blocks = find_blocks(model)
    n = len(blocks)
    if options.layers > n:
        raise IlaError(f"lisa.layers: γ = {options.layers} is more than the model's {n} decoder blocks")
    weights = None
    if options.sampling == "ranking":
        if len(context.rankings) != 1:
            raise IlaError(f"lisa.sampling ranking: needs exactly one --ranking, got {len(context.rankings)}")
        check_matches(context.rankings[0], context.layers)
        weights = block_weights(context.rankings[0], n)
    block_params = [list(b.parameters()) for b in blocks]
    in_blocks = {id(p) for ps in block_params for p in ps}
    for p in base_model_of(model).parameters():  # every block trainable now, so the optimizer holds them all
        p.requires_grad_(id(p) in in_blocks or options.train_embeddings)
    outside = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks and p.requires_grad)

    class LisaCallback(TrainerCallback):
        """Switches the active blocks at the start of every interval and frees the state of those leaving."""

        def __init__(self) -> None:
            self.active: list[int] | None = None
            self.optimizer = None
            self.schedule: list[dict] = []
            self.pending: dict | None = None  # the switch whose state size is measured after its first step

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            self.optimizer = optimizer
            if state.global_step > 0:  # resumed: the schedule so far was saved with the checkpoint
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / SCHEDULE_FILE
                if not path.is_file():
                    raise IlaError(f"lisa: {path} is missing; the checkpoint was not made by a LISA run")
                self.schedule = read_json(path, f"lisa {path}")["schedule"]

        def on_step_begin(self, args, state, control, **kwargs):
            k = state.global_step // options.interval
            wanted = active_blocks(options, n, k, config.seed, weights)
            if wanted != self.active:
                inner = getattr(self.optimizer, "optimizer", self.optimizer)
                for b in range(n):
                    on = b in wanted
                    for p in block_params[b]:
                        if not on:
                            p.grad = None
                            inner.state.pop(p, None)
                        p.requires_grad_(on)
                self.active = wanted
            if state.global_step % options.interval == 0:  # a new interval (not the middle of a resumed one)
                self.pending = {"step": state.global_step, "active": wanted}

        def on_step_end(self, args, state, control, **kwargs):
            if self.pending is not None:  # the new blocks' AdamW state exists after their first step
                active = sum(p.numel() * p.element_size() for b in self.active for p in block_params[b])
                outside_bytes = outside * block_params[0][0].element_size()
                self.schedule.append({**self.pending, "optimizer_state_bytes": state_bytes(self.optimizer),
                                      "active_param_bytes": active + outside_bytes})
                self.pending = None
            if control.should_save and state.is_world_process_zero:  # before the Trainer writes the checkpoint
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / SCHEDULE_FILE
                write_json_atomic(path, {"schedule": self.schedule})

    callback = LisaCallback()
    selection = Selection("lisa", list(context.layers), len(context.layers))

    def record() -> dict:
        return {"blocks": n, "outside_params_trained": outside, "lisa_schedule": callback.schedule}

    return Plan(model, selection, [callback], sparse_steps=True, record=record)


STRATEGY = register(Strategy(
    name="lisa", summary="full fine-tuning of γ sampled blocks at a time (+ embeddings, LM head); LISA, seeds/002",
    prepare=prepare, methods=("full",), options=LisaOptions, check=check, needs_ranking=needs_ranking,
))
