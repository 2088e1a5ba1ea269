"""Loading a trained PEFT LoRA adapter onto its base model, with one-line errors (identify's --adapter, analyze)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ila.errors import IlaError, first_line
from ila.io import check_safetensors, read_json


def load_lora_adapter(model: nn.Module, adapter: str | Path):
    """`model` with the LoRA adapter folder `adapter` applied (a `peft.PeftModel` in eval mode). One-line errors
    for a folder that is not a PEFT adapter, is not LoRA, is DoRA, does not match the model, or is unreadable."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise IlaError(f"adapter {adapter}: no adapter_config.json (expected a PEFT adapter folder)")
    adapter_config = read_json(config_file, f"adapter {adapter}: adapter_config.json")
    if not isinstance(adapter_config, dict) or adapter_config.get("peft_type") != "LORA":
        kind = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
        raise IlaError(f"adapter {adapter}: peft_type {kind!r}, expected 'LORA'")
    if adapter_config.get("use_dora"):
        raise IlaError(f"adapter {adapter}: DoRA adapters are not supported (the gate assumes ΔW = β·B·A)")
    weights_file = adapter / "adapter_model.safetensors"
    check_safetensors(adapter, f"adapter {adapter}")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        with safe_open(str(weights_file), "pt") as f:
            saved = set(f.keys())
    except Exception as exc:  # noqa: BLE001 - PEFT, safetensors and torch raise many types for a bad adapter
        reason = first_line(exc)[:200]
        raise IlaError(f"adapter {adapter}: does not match the model or is unreadable ({reason})") from None
    expected = set(get_peft_model_state_dict(peft_model))
    if saved != expected:
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        what = f"weight {extra[0]} has no matching layer" if extra else f"no weight for {missing[0]}"
        raise IlaError(f"adapter {adapter}: does not match the model ({what})")
    peft_model.eval()
    return peft_model
