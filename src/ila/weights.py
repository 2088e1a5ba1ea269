"""A model's weights read one tensor at a time from its safetensors files (no model in memory).

Data-free methods (`snr`) scan every linear layer's weight this way, so peak memory is bounded by the
largest weight, not the model: a 7B model scans on a laptop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ila.errors import IlaError
from ila.io import check_safetensors

CONVERT_HINT = ("convert it with AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
                "safe_serialization=True)")


class WeightFiles:
    """The tensors of a model folder's `*.safetensors` files, by key (`model.layers.0.mlp.up_proj.weight`)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():  # sharded: the index maps each key to its shard
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            self.files = {key: self.folder / name for key, name in weight_map.items()}
        else:
            self.files = {}
            check_safetensors(self.folder, f"model {self.folder}")
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as f:  # reads the header only
                    self.files.update(dict.fromkeys(f.keys(), file))
        if not self.files:
            other = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in self.folder.glob(pattern))
            found = f" (found {other[0]})" if other else ""
            raise IlaError(f"model {self.folder}: no safetensors weights{found}; {CONVERT_HINT}")

    def key_of(self, module_name: str) -> str:
        """The key of a module's weight: `<name>.weight`, or the one key ending in `.<name>.weight` (checkpoints
        saved with an extra prefix, e.g. a multimodal model's `language_model.`)."""
        key = f"{module_name}.weight"
        if key in self.files:
            return key
        tail = key.removeprefix("model.")
        matches = [k for k in self.files if k.endswith("." + tail) or k == tail]
        if len(matches) != 1:
            raise IlaError(f"model {self.folder}: {'no' if not matches else 'several'} safetensors weights for "
                           f"{module_name} ({key})")
        return matches[0]

    def weight(self, module_name: str) -> torch.Tensor:
        """One module's weight, read from disk alone, as float32."""
        key = self.key_of(module_name)
        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_tensor(key).float()
