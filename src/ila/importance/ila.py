"""The ILA job (seeds/000 Alg. 1): data → model → stage 1 → stage 2 → ranking → run folder.

Run folder::

    DIR/ranking.json       scores, gates and metadata (written last: its presence means the run finished)
    DIR/heatmap.png        scores per (role, block), top 75 % marked
    DIR/adapter/           the stage-1 PEFT LoRA adapter (LoRA stage 1)
    DIR/delta.safetensors  the stage-1 update θ_t − θ₀ of the gated layers (full stage 1)
    DIR/milestones/        ranking_<fraction>.json per stage-1 milestone, when asked for
    DIR/checkpoints/       Trainer checkpoints of stage 1 (for --resume)
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import set_seed

from ila.config import IdentifyConfig, to_dict
from ila.data import DEFAULT_DATA, build_dataset, collate, load_examples, split_train_heldout
from ila.errors import IlaError, first_line
from ila.importance.stage1 import run_stage1
from ila.importance.stage2 import run_stage2
from ila.io import check_output_folder
from ila.layers import LayerId, base_model_of, discover_layers
from ila.models import load_model, model_label
from ila.ranking import Ranking
from ila.report import plot_heatmap

log = logging.getLogger(__name__)

PACKAGES = ("ila", "torch", "transformers", "peft", "accelerate", "datasets")


def package_versions() -> dict[str, str]:
    """Versions of the packages a ranking depends on, for run metadata."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_identify(config: IdentifyConfig, out: str | Path, *, resume: bool = False) -> Ranking:
    """Rank the linear layers of `config.model` for fine-tuning on `config.data`; write the run folder `out`."""
    config.validate()
    out = Path(out)
    if config.adapter and (config.stage1.method != "lora" or config.stage1.milestones or resume):
        raise IlaError("--adapter runs stage 2 alone: it takes no --method full, --milestones or --resume")
    check_output_folder(out, "ranking.json", resume=resume)
    started = time.perf_counter()
    set_seed(config.seed)
    examples = load_examples(config.data, max_examples=config.max_examples, seed=config.seed)  # fail fast
    model, tokenizer = load_model(config.model, trust_remote_code=False)
    layers = discover_layers(model, config.lora.target_roles)
    linear_layers = len(discover_layers(model))
    if config.adapter:
        model, layers = _load_adapter(model, layers, config.adapter)
    dataset = build_dataset(examples, tokenizer, max_length=config.max_length)
    train, heldout = split_train_heldout(dataset, heldout_fraction=config.heldout_fraction, seed=config.seed)
    collator = collate(tokenizer)
    timings: dict[str, float] = {"load_s": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    meta: dict = {
        "model": model_label(config.model),
        "data": config.data or DEFAULT_DATA,
        "seed": config.seed,
        "method": "stage2-on-adapter" if config.adapter else f"ila-{config.stage1.method}",
        "ranked_layers": len(layers),
        "ranked_layer_fraction": len(layers) / linear_layers,  # stage 1 trains exactly the ranked layers
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "epsilon": config.stage1.epsilon,
        "config": to_dict(config),
        "versions": package_versions(),
    }

    initial = None
    milestones: list = []
    if config.adapter:
        shutil.copytree(config.adapter, out / "adapter", dirs_exist_ok=True)
        meta.update(adapter=str(config.adapter), stability_step=None, stage1_steps=0)
    else:
        t = time.perf_counter()
        set_seed(config.seed)
        s1 = run_stage1(model, layers, train, collator, config, out / "checkpoints", probe_dataset=heldout,
                        resume=resume)
        timings["stage1_s"] = time.perf_counter() - t
        model, initial, milestones = s1.model, s1.initial, s1.milestones
        meta.update(stability_step=s1.stability_step, stage1_steps=s1.steps, stage1_cost=s1.cost,
                    stage1_final_loss=s1.losses[-1] if s1.losses else None, stage1_probe_losses=s1.probe_losses)
        missing = sorted(set(config.stage1.milestones) - {f for f, _, _ in milestones})
        if missing:  # after the ε-stop, or before the step a resumed run started from
            log.warning("no snapshot for milestones %s: stage 1 did not pass their steps in this process", missing)
            meta["milestones_missing"] = missing
        _save_update(model, layers, initial, out)

    for fraction, step, weights in milestones:
        current = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
        _load_weights(model, weights)
        set_seed(config.seed)
        s2 = run_stage2(model, layers, train, collator, config, out / "stage2", initial=initial)
        _load_weights(model, current)
        ranking = _ranking(layers, s2.scores, {**meta, "milestone": fraction, "milestone_step": step})
        ranking.save(out / "milestones" / f"ranking_{fraction:g}.json")

    t = time.perf_counter()
    set_seed(config.seed)
    s2 = run_stage2(model, layers, train, collator, config, out / "stage2", initial=initial)
    timings["stage2_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    meta.update(stage2_steps=len(s2.losses), stage2_cost=s2.cost,
                stage2_final_loss=s2.losses[-1] if s2.losses else None, timings=timings)
    ranking = _ranking(layers, s2.scores, meta)
    plot_heatmap(ranking, out / "heatmap.png", title=f"ILA scores: {meta['model']} on {meta['data']}")
    shutil.rmtree(out / "stage2", ignore_errors=True)
    ranking.save(out / "ranking.json")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # kept only to resume an unfinished run
    return ranking


def _ranking(layers: list[LayerId], scores: list[float], meta: dict) -> Ranking:
    if not all(math.isfinite(s) for s in scores):
        raise IlaError("stage 2 diverged (non-finite scores); lower stage2.learning_rate or check the data")
    return Ranking.from_scores(layers, scores, meta)


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def _save_update(model, layers: list[LayerId], initial, out: Path) -> None:
    """Stage-1 adapter (LoRA) or ΔW = θ_t − θ₀ of the gated layers (full), as safetensors."""
    if initial is None:
        model.save_pretrained(out / "adapter")
        return
    base = base_model_of(model)
    delta = {}
    for layer in layers:
        for pname, p in base.get_submodule(layer.name).named_parameters(recurse=False):
            delta[f"{layer.name}.{pname}"] = (p.detach() - initial[layer.name][pname].to(p.device)).contiguous().cpu()
    save_file(delta, str(out / "delta.safetensors"))


def _load_adapter(model, layers: list[LayerId], adapter: str | Path):
    """Load a trained PEFT LoRA adapter for stage 2 alone; return the PEFT model and the layers it adapts."""
    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise IlaError(f"adapter {adapter}: no adapter_config.json (expected a PEFT adapter folder)")
    try:
        adapter_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IlaError(f"adapter {adapter}: adapter_config.json is not valid JSON ({exc})") from None
    if not isinstance(adapter_config, dict) or adapter_config.get("peft_type") != "LORA":
        kind = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
        raise IlaError(f"adapter {adapter}: peft_type {kind!r}, expected 'LORA'")
    if adapter_config.get("use_dora"):
        raise IlaError(f"adapter {adapter}: DoRA adapters are not supported (the gate assumes ΔW = β·B·A)")
    weights_file = adapter / "adapter_model.safetensors"
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
    base = base_model_of(peft_model)
    adapted = [layer for layer in layers if hasattr(base.get_submodule(layer.name), "lora_B")]
    if not adapted:
        raise IlaError(f"adapter {adapter}: adapts none of the model's linear layers")
    if all(not torch.any(p) for n, p in peft_model.named_parameters() if "lora_B" in n):
        raise IlaError(f"adapter {adapter}: is untrained (every lora_B is zero), so no layer's update can be scored")
    peft_model.eval()
    return peft_model, adapted
