"""The Python API; the CLI calls exactly these functions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ila.config import IdentifyConfig, TrainConfig, load_config, with_overrides
from ila.errors import IlaError

if TYPE_CHECKING:
    from ila.ranking import Ranking

def identify_options() -> dict[str, str]:
    """Keyword options of `identify` (the CLI's flags by their Python names) → the config key each one sets:
    the shared fields, the stage-1 update, and every registered method's options (from its file)."""
    from ila.importance.base import methods
    from ila.options import flag_paths

    return _with_option_flags(flag_paths(IdentifyConfig), methods(), "method")


def _with_option_flags(options: dict[str, str], registry: dict[str, Any], what: str) -> dict[str, str]:
    """`options` plus the flags of every registered method's or strategy's options (under its name)."""
    from ila.options import flag_paths

    for name, item in registry.items():
        if item.options is not None:
            for keyword, dotted in flag_paths(item.options, f"{name}.").items():
                if keyword in options:
                    raise ValueError(f"{what} {name}: flag of {dotted} repeats the flag of {options[keyword]}")
                options[keyword] = dotted
    return options


def check_options(job: str, options: dict[str, Any], allowed) -> None:
    """One-line `IlaError` naming the first of `options` that is not in `allowed` (keyword options of `job`)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise IlaError(f"{job}: unknown option {unknown[0]!r} (expected one of: {', '.join(allowed)})")


def identify(
    out: str | Path,
    *,
    config: IdentifyConfig | str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> Ranking | dict[str, Ranking]:
    """Rank the linear layers of a model for a dataset with an importance method; write the run folder `out`.
    With `method="all"`, every method runs on one shared stage-1 update and the result is {method: Ranking}.

    `config` is an `IdentifyConfig` or a YAML path; `options` are the CLI's options by their Python names
    (`method`, `model`, `data`, `adapter`, `seed`, `max_steps`, ... and each method's own, e.g. `stage2_steps`;
    see `identify_options()`) and override it.
    """
    from ila.importance.job import run_identify

    allowed = identify_options()
    check_options("identify", options, allowed)
    overrides = {allowed[k]: v for k, v in options.items()}
    # an in-memory config goes through the same validation as a YAML file
    config = with_overrides(config, overrides) if isinstance(config, IdentifyConfig) else load_config(config, overrides)
    return run_identify(config, out, resume=resume)


def list_strategies() -> str:
    """One line per training strategy: its name, what it trains when, the methods it works with."""
    from ila.training.strategies.base import describe

    return describe()


def list_methods() -> str:
    """One line per importance method: its name, what it measures and what it needs."""
    from ila.importance.base import describe

    return describe()


def list_datasets() -> list[dict[str, Any]]:
    """The data sets that ship inside ila: per set its name, kind (`sft` for `data=NAME`, `eval` for a
    benchmark), rows per split, licence, purpose and the hub name of the same data (`ila.data.embedded`)."""
    from ila.data.embedded import describe

    return describe()


TRAIN_OPTIONS = ("model", "data", "method", "strategy", "select", "rankings", "transfer", "seed", "select_seed",
                 "max_steps", "max_examples", "max_length", "learning_rate", "batch_size", "train_other", "data_seed",
                 "gradient_checkpointing", "report_to", "save_steps")


def train_options() -> dict[str, str]:
    """Keyword options of `train` (the CLI's flags by their Python names) → the config key each one sets: the
    shared fields and every registered strategy's options (from its file, e.g. `lisa_layers` → `lisa.layers`)."""
    from ila.training.strategies.base import strategies

    return _with_option_flags({name: name for name in TRAIN_OPTIONS}, strategies(), "strategy")


def train(out: str | Path, *, config: TrainConfig | str | Path | None = None, resume: bool = False,
          **options: Any):
    """Fine-tune (`ila train`) under a training strategy; writes the run folder `out` and returns a `TrainRun`.

    `options` are the CLI's options by their Python names (`model`, `data`, `method`, `strategy`, `select`,
    `rankings`, `seed`, `max_steps`, ... and each strategy's own, e.g. `lisa_layers`, `segments`; see
    `train_options()`) and override `config`.
    """
    from ila.training.finetune import run_train

    allowed = train_options()
    check_options("train", options, allowed)
    given = {allowed[k]: v for k, v in options.items() if v is not None and v != []}
    if isinstance(config, TrainConfig):
        return run_train(with_overrides(config, given), out, resume=resume)
    return run_train(load_config(config, given, TrainConfig), out, resume=resume)


def analyze_options() -> dict[str, str]:
    """Keyword options of `analyze` (the CLI's flags by their Python names) → the config key each one sets."""
    from ila.config import AnalyzeConfig
    from ila.options import flag_paths

    return flag_paths(AnalyzeConfig)


def analyze(out: str | Path, *, config: str | Path | None = None, **options: Any) -> list[dict]:
    """Compare a base and a tuned model layer by layer (`ila analyze`); writes the run folder `out` and returns
    the metric rows (`metric, layer, mode, base, tuned, value`). `options` are the CLI's options by their Python
    names (`base`, `tuned`, `data`, `ranking`, `max_examples`, `segments`, ...; see `analyze_options()`)."""
    from ila.analysis.job import run_analyze
    from ila.config import AnalyzeConfig

    allowed = analyze_options()
    check_options("analyze", options, allowed)
    given = {allowed[k]: v for k, v in options.items() if v is not None}
    return run_analyze(load_config(config, given, AnalyzeConfig), out)


def experiment(config: str | Path, out: str | Path) -> Path:
    """Run a YAML grid of fine-tunes (`ila experiment`), skipping finished cells; returns the Markdown table."""
    from ila.distributed import refuse_distributed
    from ila.experiment import run_experiment

    refuse_distributed("experiment", "it runs its cells one after another and evaluates them with lm-eval in one "
                       "process; launch each `ila train` or `ila identify` distributed instead")
    return run_experiment(config, out)


EVAL_OPTIONS = ("model", "adapter", "run", "data", "max_examples", "max_length", "seed", "mc", "exact", "limit",
                "judge_endpoint", "judge_model", "questions", "out")


def evaluate(**options: Any) -> dict:
    """Score a model, adapter or run folder (`ila eval`); options are the CLI's by their Python names."""
    from ila.distributed import refuse_distributed
    from ila.evaluation.job import run_eval

    check_options("evaluate", options, EVAL_OPTIONS)
    refuse_distributed("eval", "lm-eval scores an in-memory model in one process")
    return run_eval(**{k: v for k, v in options.items() if v is not None})
