"""The Python API; the CLI calls exactly these functions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ila.config import IdentifyConfig, TrainConfig, load_config, with_overrides
from ila.errors import IlaError

if TYPE_CHECKING:
    from ila.ranking import Ranking

# Keyword options of `identify` (the CLI's options) and the config field each one sets.
IDENTIFY_OPTIONS = {
    "model": "model",
    "data": "data",
    "adapter": "adapter",
    "seed": "seed",
    "max_examples": "max_examples",
    "max_length": "max_length",
    "max_steps": "stage1.max_steps",
    "method": "stage1.method",
    "epsilon": "stage1.epsilon",
    "milestones": "stage1.milestones",
    "stage2_steps": "stage2.steps",
    "init_score": "stage2.init_score",
    "budget": "stage2.budget",
}


def _check_options(job: str, options: dict[str, Any], allowed) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise IlaError(f"{job}: unknown option {unknown[0]!r} (expected one of: {', '.join(allowed)})")


def identify(
    out: str | Path,
    *,
    config: IdentifyConfig | str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> Ranking:
    """Run ILA and write the run folder `out`; returns the ranking.

    `config` is an `IdentifyConfig` or a YAML path; `options` are the CLI's options by their Python names
    (`model`, `data`, `adapter`, `seed`, `max_steps`, `stage2_steps`, `method`, `epsilon`, `init_score`,
    `budget`, `max_examples`, `max_length`, `milestones`) and override it.
    """
    from ila.importance.ila import run_identify

    _check_options("identify", options, IDENTIFY_OPTIONS)
    overrides = {IDENTIFY_OPTIONS[k]: v for k, v in options.items()}
    # an in-memory config goes through the same validation as a YAML file
    config = with_overrides(config, overrides) if isinstance(config, IdentifyConfig) else load_config(config, overrides)
    return run_identify(config, out, resume=resume)



TRAIN_OPTIONS = ("model", "data", "method", "select", "rankings", "transfer", "seed", "select_seed", "max_steps",
                 "max_examples", "max_length", "learning_rate", "batch_size", "train_other", "data_seed")


def train(out: str | Path, *, config: TrainConfig | str | Path | None = None, resume: bool = False,
          **options: Any):
    """Fine-tune the selected layers (`ila train`); writes the run folder `out` and returns a `TrainRun`.

    `options` are the CLI's options by their Python names (`model`, `data`, `method`, `select`, `rankings`,
    `transfer`, `seed`, `select_seed`, `max_steps`, `max_examples`, `max_length`, `learning_rate`, `batch_size`,
    `train_other`, `data_seed`).
    """
    from ila.training.finetune import run_train

    _check_options("train", options, TRAIN_OPTIONS)
    given = {k: v for k, v in options.items() if v is not None and v != []}
    if isinstance(config, TrainConfig):
        return run_train(with_overrides(config, given), out, resume=resume)
    return run_train(load_config(config, given, TrainConfig), out, resume=resume)


def experiment(config: str | Path, out: str | Path) -> Path:
    """Run a YAML grid of fine-tunes (`ila experiment`), skipping finished cells; returns the Markdown table."""
    from ila.experiment import run_experiment

    return run_experiment(config, out)


EVAL_OPTIONS = ("model", "adapter", "run", "data", "max_examples", "max_length", "seed", "mc", "exact", "limit",
                "judge_endpoint", "judge_model", "questions", "out")


def evaluate(**options: Any) -> dict:
    """Score a model, adapter or run folder (`ila eval`); options are the CLI's by their Python names."""
    from ila.evaluation.job import run_eval

    _check_options("evaluate", options, EVAL_OPTIONS)
    return run_eval(**{k: v for k, v in options.items() if v is not None})
