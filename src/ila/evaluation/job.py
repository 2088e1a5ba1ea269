"""`ila eval`: score a base model, a PEFT adapter or a finished run folder; write one JSON of results.

What is scored (each optional): held-out loss and perplexity on instruction data (response tokens only),
multiple-choice accuracy through lm-eval, generative exact match, and a judge's 1–10 ratings.
A run folder (`ila train` or `ila identify`) brings its own model, adapter and, without `--data`, its own
held-out split (same data, seed and fraction), so `ila eval --run DIR` reproduces the run's held-out loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ila.errors import IlaError, first_line
from ila.io import write_json_atomic


def _run_info(run: Path) -> dict[str, Any]:
    for name in ("run.json", "ranking.json"):
        if (run / name).is_file():
            data = json.loads((run / name).read_text())
            return data.get("metadata", data)
    raise IlaError(f"run {run}: no run.json or ranking.json (expected a finished ila train/identify folder)")


def load_for_eval(model: str | None, adapter: str | Path | None, run: str | Path | None):
    """The model (with its adapter, if any) and tokenizer to score, plus what was loaded."""
    import torch

    from ila.models import load_model

    source: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if run is not None:
        run = Path(run)
        info = _run_info(run)
        source = {"run": str(run)}
        if (run / "model" / "config.json").is_file():  # full fine-tuning
            model_obj, tokenizer = load_model(str(run / "model"))
            return model_obj, tokenizer, {**source, "model": str(run / "model")}, info
        model = model or info.get("model")
        adapter = adapter or (run / "adapter" if (run / "adapter").is_dir() else None)
    quant = None
    if info.get("method") == "qlora":  # score the adapter on the 4-bit base it was trained on
        from ila.training.methods import quantization_config

        quant = quantization_config(torch.float32)
    model_obj, tokenizer = load_model(model, quantization_config=quant)
    source["model"] = model or "smollm2-135m"
    if adapter is not None:
        from peft import PeftModel

        try:
            model_obj = PeftModel.from_pretrained(model_obj, str(adapter), is_trainable=False)
        except Exception as exc:  # noqa: BLE001 - PEFT raises many types for an adapter that does not fit
            reason = first_line(exc)[:200]
            raise IlaError(f"adapter {adapter}: does not match model {source['model']} ({reason})") from None
        source["adapter"] = str(adapter)
    model_obj.eval()
    return model_obj, tokenizer, source, info


def eval_settings(mc: list[str] | None, exact: list[str] | None, limit: int | None, seed: int) -> dict[str, Any]:
    """The tasks, example limit and sampling seed behind a result's MC / exact-match scores."""
    return {"mc": list(mc or []), "exact": list(exact or []), "limit": limit, "seed": seed}


def run_eval(
    *,
    model: str | None = None,
    adapter: str | Path | None = None,
    run: str | Path | None = None,
    data: str | None = None,
    max_examples: int | None = None,
    max_length: int = 512,
    seed: int = 0,
    heldout: bool = True,
    mc: list[str] | None = None,
    exact: list[str] | None = None,
    limit: int | None = 50,
    judge_endpoint: str | None = None,
    judge_model: str | None = None,
    questions: str | Path | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate and return {"source", "settings", "heldout", "multiple_choice", "exact_match", "judge"}; write `out`
    if given. `settings` records what the MC / exact-match scores depend on (see `eval_settings`).

    `heldout=False` skips the held-out loss (e.g. when the run already recorded it).
    """
    from ila.data import build_dataset, collate, load_examples, split_train_heldout
    from ila.evaluation.exact_match import exact_match
    from ila.evaluation.heldout import heldout_loss
    from ila.evaluation.judge import generate_answers, judge
    from ila.evaluation.multiple_choice import multiple_choice

    if limit is not None and limit <= 0:
        raise IlaError(f"--limit: {limit!r} must be > 0")
    if judge_endpoint and not (judge_model and questions):
        raise IlaError("--judge-endpoint needs --judge-model and --questions")
    questions_list = _read_questions(Path(questions)) if questions else []
    model_obj, tokenizer, source, info = load_for_eval(model, adapter, run)
    results: dict[str, Any] = {"source": source, "settings": eval_settings(mc, exact, limit, seed)}

    config = info.get("config", {}) if info else {}
    if heldout and (data is not None or run is not None):
        spec = data if data is not None else config.get("data")
        run_seed = seed if data is not None else (config.get("data_seed") if config.get("data_seed") is not None
                                                  else config.get("seed", seed))
        examples = load_examples(spec, max_examples=max_examples if data is not None else config.get("max_examples"),
                                 seed=run_seed)
        dataset = build_dataset(examples, tokenizer, max_length=max_length if data is not None
                                else config.get("max_length", max_length))
        if data is None:  # the run's own held-out split
            _, dataset = split_train_heldout(dataset, heldout_fraction=config.get("heldout_fraction", 0.1),
                                             seed=run_seed)
        if len(dataset):
            results["heldout"] = {"data": spec or "default", **heldout_loss(model_obj, dataset, collate(tokenizer))}
    if mc:
        results["multiple_choice"] = multiple_choice(model_obj, tokenizer, list(mc), limit=limit, seed=seed)
    if exact:
        results["exact_match"] = {spec: exact_match(model_obj, tokenizer, spec, limit=limit or 50, seed=seed)
                                  for spec in exact}
    if judge_endpoint:
        answers = generate_answers(model_obj, tokenizer, questions_list, max_new_tokens=512)
        results["judge"] = judge(answers, endpoint=judge_endpoint, model=judge_model)
    if out is not None:
        write_json_atomic(Path(out), results)
    return results


def _read_questions(path: Path) -> list[str]:
    if not path.is_file():
        raise IlaError(f"questions {path}: file not found")
    try:
        rows = (json.loads(path.read_text()) if path.suffix == ".json"
                else [json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    except json.JSONDecodeError as exc:
        raise IlaError(f"questions {path}: not valid JSON ({exc})") from None
    out = []
    for i, row in enumerate(rows if isinstance(rows, list) else []):
        text = row if isinstance(row, str) else row.get("question") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise IlaError(f"questions {path}: row {i} has no 'question' string")
        out.append(text)
    if not out:
        raise IlaError(f"questions {path}: expected a list of questions (strings or {{'question': ...}})")
    return out
