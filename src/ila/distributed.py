"""Where a job runs: one process, or several under `torchrun` / `accelerate launch` (DDP, FSDP, DeepSpeed).

Every process runs the same job on the same data, split and seed; the Trainer (through accelerate) shards the
batches and averages the gradients. Only the main process writes run folders, plots and logs (`is_main_process`).
Code that reads or writes a whole weight while an engine shards parameters (FSDP, DeepSpeed ZeRO-3) does it
inside `full_weights(module)`, which gathers them through the engine's own API.
"""

from __future__ import annotations

import json
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
    """The DeepSpeed ZeRO stage accelerate was launched with (None when DeepSpeed is not used). accelerate passes
    it in ACCELERATE_DEEPSPEED_ZERO_STAGE, or names a DeepSpeed JSON file whose `zero_optimization.stage` says it;
    a stage that cannot be read counts as 3 (sharded), the case that needs care."""
    if engine() != "deepspeed":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None:
        try:
            with open(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]) as f:
                stage = json.load(f)["zero_optimization"]["stage"]
        except (KeyError, OSError, ValueError, TypeError):
            return 3
    try:
        return int(stage)
    except ValueError:
        return 3


def shards_parameters() -> bool:
    """Parameters live in pieces across processes (FSDP, ZeRO-3): whole weights must be gathered to be read."""
    return engine() == "fsdp" or zero_stage() == 3


def refuse_distributed(what: str, why: str, *, engines: bool = False, sharded: bool = False) -> None:
    """One-line `IlaError` on every process when `what` cannot run in this launch: with `engines`, under FSDP or
    DeepSpeed (any stage); with `sharded`, where parameters are sharded (FSDP, ZeRO-3); otherwise under any
    multi-process launch. Called before any collective, so no process waits for another that has stopped."""
    if engines or sharded:
        if (engines and engine() is not None) or (sharded and shards_parameters()):
            raise IlaError(f"{what}: cannot run under {engine_label()} ({why}); use DDP (a plain multi-process "
                           "launch: torchrun, or configs/accelerate/ddp.yaml)")
    elif world_size() > 1:
        raise IlaError(f"{what}: cannot run in a {world_size()}-process launch ({why}); run it as one process")


def barrier() -> None:
    """Wait until every process of the launch gets here (nothing outside a launch). The process group is the one
    the Trainer would set up (accelerate's PartialState: gloo on CPU, nccl on GPUs)."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def wait_to_stop(timeout_s: float = 60.0) -> None:
    """Before a process of a torchrun/accelerate launch exits on an error it has reported: wait (at most
    `timeout_s`) until every process has reached this point too, so that torchrun, which stops the others as soon
    as one exits, lets each of them report its own error. Uses the launcher's key-value store (no process group,
    which may not exist yet); outside such a launch it returns at once."""
    if world_size() <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from datetime import timedelta

    import torch.distributed as dist

    key = f"ila/stopping/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(),
                              is_master=False, timeout=timedelta(seconds=timeout_s))
        if store.add(key, 1) == world_size():
            store.set(f"{key}/all", "1")
        store.wait([f"{key}/all"], timedelta(seconds=timeout_s))
    except (RuntimeError, KeyError, ValueError):  # a process that never errs, or no store: stop anyway
        pass


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
