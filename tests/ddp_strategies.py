"""Run under `torchrun --nproc_per_node 2`: every training strategy trains under DDP (CPU, gloo).

argv: model folder, data file, output folder. Each process writes `rank<r>.json`: its rank, the world size the
Trainer saw, and a checksum of each strategy's trained weights (equal on every process if DDP kept them in sync).
"""

import json
import sys
from pathlib import Path

import torch

import ila
from ila.config import TrainConfig

model, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
RUNS = {
    "selection": {"method": "lora", "select": "first:0.5"},
    "lisa": {"method": "full", "strategy": "lisa", "lisa.layers": 1, "lisa.interval": 2,
             "gradient_checkpointing": True},
    "ist": {"method": "lora", "strategy": "ist", "ist.interval": 2},
    "midblock": {"method": "lora", "strategy": "midblock", "midblock.segments": "01"},
}
report = {}
for name, overrides in RUNS.items():
    config = ila.load_config(None, {"model": model, "data": data, "max_steps": 4, "batch_size": 2,
                                    "max_length": 32, "save_steps": 100, "lora.r": 4, **overrides}, TrainConfig)
    run = ila.train(out / name, config=config)
    trained = [p.detach().double().sum().item() for p in run.model.parameters()]
    report[name] = {"world_size": run.trainer.args.world_size, "checksum": sum(trained)}
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
(out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **report}))
