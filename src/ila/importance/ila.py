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
import platform
import shutil
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import set_seed

from ila.config import IdentifyConfig, to_dict
from ila.data import build_dataset, collate, load_examples, split_train_heldout
from ila.errors import IlaError
from ila.importance.stage1 import run_stage1
from ila.importance.stage2 import run_stage2
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
    if (out / "ranking.json").exists() and not resume:
        raise IlaError(f"output folder {out}: already holds a finished run (ranking.json); choose another --out")
    started = time.perf_counter()
    set_seed(config.seed)
    examples = load_examples(config.data, max_examples=config.max_examples, seed=config.seed)  # fail fast
    model, tokenizer = load_model(config.model, trust_remote_code=False)
    layers = discover_layers(model, config.lora.target_roles)
    dataset = build_dataset(examples, tokenizer, max_length=config.max_length)
    train, heldout = split_train_heldout(dataset, heldout_fraction=config.heldout_fraction, seed=config.seed)
    collator = collate(tokenizer)
    timings: dict[str, float] = {"load_s": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    meta: dict = {
        "model": model_label(config.model),
        "data": config.data or "default",
        "seed": config.seed,
        "method": "stage2-on-adapter" if config.adapter else f"ila-{config.stage1.method}",
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "epsilon": config.stage1.epsilon,
        "config": to_dict(config),
        "versions": package_versions(),
    }

    initial = None
    if config.adapter:
        model, layers = _load_adapter(model, layers, config.adapter)
        meta.update(adapter=str(config.adapter), stability_step=None, stage1_steps=0)
        milestones: list = []
    else:
        t = time.perf_counter()
        set_seed(config.seed)
        s1 = run_stage1(model, layers, train, collator, config, out / "checkpoints", probe_dataset=heldout,
                        resume=resume)
        timings["stage1_s"] = time.perf_counter() - t
        model, initial, milestones = s1.model, s1.initial, s1.milestones
        meta.update(stability_step=s1.stability_step, stage1_steps=s1.steps, stage1_cost=s1.cost,
                    stage1_final_loss=s1.losses[-1] if s1.losses else None, stage1_probe_losses=s1.probe_losses)
        _save_update(model, layers, initial, out)

    for fraction, step, weights in milestones:
        current = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
        _load_weights(model, weights)
        set_seed(config.seed)
        s2 = run_stage2(model, layers, train, collator, config, out / "stage2", initial=initial)
        _load_weights(model, current)
        ranking = Ranking.from_scores(layers, s2.scores, {**meta, "milestone": fraction, "milestone_step": step})
        ranking.save(out / "milestones" / f"ranking_{fraction:g}.json")

    t = time.perf_counter()
    set_seed(config.seed)
    s2 = run_stage2(model, layers, train, collator, config, out / "stage2", initial=initial)
    timings["stage2_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    meta.update(stage2_steps=len(s2.losses), stage2_cost=s2.cost,
                stage2_final_loss=s2.losses[-1] if s2.losses else None, timings=timings)
    ranking = Ranking.from_scores(layers, s2.scores, meta)
    plot_heatmap(ranking, out / "heatmap.png", title=f"ILA scores: {meta['model']} on {meta['data']}")
    shutil.rmtree(out / "stage2", ignore_errors=True)
    ranking.save(out / "ranking.json")
    return ranking


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
            delta[f"{layer.name}.{pname}"] = (p.detach() - initial[layer.name][pname]).contiguous().cpu()
    save_file(delta, str(out / "delta.safetensors"))


def _load_adapter(model, layers: list[LayerId], adapter: str | Path):
    """Load a PEFT LoRA adapter for stage 2 alone; return the PEFT model and the layers it adapts."""
    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise IlaError(f"adapter {adapter}: no adapter_config.json (expected a PEFT adapter folder)")
    try:
        peft_type = json.loads(config_file.read_text()).get("peft_type")
    except json.JSONDecodeError as exc:
        raise IlaError(f"adapter {adapter}: adapter_config.json is not valid JSON ({exc})") from None
    if peft_type != "LORA":
        raise IlaError(f"adapter {adapter}: peft_type {peft_type!r}, expected 'LORA'")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IlaError(f"adapter {adapter}: does not match the model ({first[:200]})") from None
    base = base_model_of(peft_model)
    adapted = [layer for layer in layers if hasattr(base.get_submodule(layer.name), "lora_B")]
    if not adapted:
        raise IlaError(f"adapter {adapter}: adapts none of the model's linear layers")
    weights_file = adapter / "adapter_model.safetensors"
    if weights_file.is_file():
        model_keys = {n for n, _ in peft_model.named_parameters() if ".lora_" in n}
        with safe_open(str(weights_file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                stem = key.removesuffix(".weight")
                if not any(n.startswith(stem + ".") for n in model_keys):
                    raise IlaError(f"adapter {adapter}: weight {key} has no matching layer in the model")
    peft_model.eval()
    return peft_model, adapted
