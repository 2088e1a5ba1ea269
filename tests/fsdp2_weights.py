"""Run under `torchrun --nproc_per_node 2`: ila's whole-weight code on FSDP2-sharded parameters (CPU, gloo).

accelerate applies FSDP only on accelerators, so this shards a tiny llama with torch's own `fully_shard`, the API
accelerate's FSDP2 uses. Then, on the sharded model, what the unsharded weights give: full update — θ₀ copies
(`prepare_full`), ΔW (`Update.delta`), the saved `delta.safetensors`; LoRA update — ΔW = β·B·A and the saved
adapter. argv: output folder. Each process writes `rank<r>.json`.
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

from ila.config import LoraConfig
from ila.importance.stage1 import Update, prepare_full, save_update
from ila.layers import base_model_of, discover_layers
from ila.training.lora import lora_config

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

# LoRA: trained-looking B (nonzero), so ΔW = β·B·A is not zero
from peft import get_peft_model  # noqa: E402

torch.manual_seed(1)
peft_model = get_peft_model(make_model("llama"), lora_config(LoraConfig(r=4, dropout=0.0), [x.name for x in layers]))
with torch.no_grad():
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_()
unsharded = Update(peft_model, layers)
expected_delta = {x.name: unsharded.delta(x).clone() for x in layers}
expected_state = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
for block in base_model_of(peft_model).model.layers:
    fully_shard(block, mesh=mesh)
fully_shard(peft_model, mesh=mesh)
lora_update = Update(peft_model, layers)
lora_delta = all(torch.allclose(lora_update.delta(x), expected_delta[x.name], atol=1e-6) for x in layers)
save_update(lora_update, out)
dist.barrier()
adapter = load_file(out / "adapter" / "adapter_model.safetensors")
lora_written = len(adapter) == len(expected_state) and all(
    torch.equal(adapter[k.replace(".default", "")], v) for k, v in expected_state.items())
(out / f"rank{rank}.json").write_text(json.dumps({"sharded": sharded, "theta0": theta0, "delta": delta,
                                                   "written": written, "lora_delta": lora_delta,
                                                   "lora_written": lora_written}))
dist.destroy_process_group()
