"""Where a job runs: one process, or several under `torchrun` / `accelerate launch` (DDP, FSDP, DeepSpeed).

Every process runs the same job on the same data, split and seed; the Trainer (through accelerate) shards the
batches and averages the gradients. Only the main process writes run folders, plots and logs (`is_main_process`).
Code that reads or writes a whole weight while an engine shards parameters (FSDP, DeepSpeed ZeRO-3) does it
inside `full_weights(module)`, which gathers them through the engine's own API.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ila.errors import IlaError


def world_size() -> int:
    """Processes taking part in this job (1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """The process that writes files and prints results."""
    return rank() == 0


def engine() -> str | None:
    """The sharding engine accelerate was launched with: "fsdp", "deepspeed", or None (DDP or one process).
    accelerate's launcher passes its choice to every process in these variables."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def zero_stage() -> int | None:
    """The DeepSpeed ZeRO stage accelerate was launched with (None when DeepSpeed is not used)."""
    if engine() != "deepspeed":
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def shards_parameters() -> bool:
    """Parameters live in pieces across processes (FSDP, ZeRO-3): whole weights must be gathered to be read."""
    return engine() == "fsdp" or zero_stage() == 3


def refuse_distributed(what: str, why: str, *, sharded_only: bool = False) -> None:
    """One-line `IlaError` on every process when `what` cannot run in this launch: under any multi-process launch,
    or with `sharded_only` only where parameters are sharded. Called before any collective, so no process waits
    for another that has stopped."""
    if sharded_only:
        if shards_parameters():
            raise IlaError(f"{what}: cannot run under {engine_label()} ({why}); use DDP (a plain multi-process "
                           "launch) or ZeRO-2")
    elif world_size() > 1:
        raise IlaError(f"{what}: cannot run in a {world_size()}-process launch ({why}); run it as one process")


def engine_label() -> str:
    stage = zero_stage()
    return "FSDP" if engine() == "fsdp" else f"DeepSpeed ZeRO-{stage}" if stage else "DDP"


@contextmanager
def full_weights(module: Any, *, modify: bool = False) -> Iterator[None]:
    """Inside the block, the parameters of `module` (a module, or a list of parameters) are whole on every process
    (`modify`: writes made on the main process are kept). ZeRO-3 parameters (they carry `ds_id`) are gathered
    with `deepspeed.zero.GatheredParameters`, a collective: enter it on every process. Unsharded ones (one
    process, DDP, ZeRO-1/2) need nothing. FSDP2 (configs/accelerate/fsdp.yaml) keeps each parameter as a DTensor:
    read it through `whole(tensor)`."""
    params = list(module.parameters()) if hasattr(module, "parameters") else list(module)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
    else:
        yield


def whole(tensor: Any) -> Any:
    """The full value of `tensor`: an FSDP2 DTensor shard is gathered (`full_tensor()`), anything else as is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor
