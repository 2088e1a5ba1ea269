"""Run under `torchrun --nproc_per_node 2`: ila's whole-weight code on FSDP2-sharded parameters (CPU, gloo).

accelerate applies FSDP only on accelerators, so this shards a tiny llama with torch's own `fully_shard`, the API
accelerate's FSDP2 uses. Then, on the sharded model: θ₀ copies (`prepare_full`), ΔW (`Update.delta`) and the saved
`delta.safetensors` must equal what the unsharded weights give. argv: output folder. Each process writes
`rank<r>.json`.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import make_model
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ila.importance.stage1 import Update, prepare_full, save_update
from ila.layers import discover_layers

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
model = make_model("llama")
reference = {k: v.clone() for k, v in model.state_dict().items()}
layers = discover_layers(model)
for block in model.model.layers:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
weight = model.get_submodule(layers[0].name).weight
sharded = type(weight).__name__ == "DTensor" and weight.to_local().shape[0] < weight.shape[0]

initial = prepare_full(model, layers)
theta0 = all(torch.equal(initial[x.name]["weight"], reference[f"{x.name}.weight"]) for x in layers)
with torch.no_grad():  # a known update: layer i moves by i + 1
    for i, x in enumerate(layers):
        model.get_submodule(x.name).weight.add_(float(i + 1))
update = Update(model, layers, initial)
delta = all(torch.allclose(update.delta(x), torch.full_like(reference[f"{x.name}.weight"], i + 1.0))
            for i, x in enumerate(layers))
save_update(update, out)  # a collective on every process; the main one writes
dist.barrier()
saved = load_file(out / "delta.safetensors")
written = all(torch.allclose(saved[f"{x.name}.weight"], torch.full_like(reference[f"{x.name}.weight"], i + 1.0))
              for i, x in enumerate(layers))
(out / f"rank{rank}.json").write_text(json.dumps({"sharded": sharded, "theta0": theta0, "delta": delta,
                                                   "written": written}))
dist.destroy_process_group()
