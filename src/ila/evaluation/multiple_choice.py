"""Multiple-choice accuracy through lm-evaluation-harness, on embedded benchmarks, BIG-bench tasks or local files.

A task spec is one of:

* an embedded benchmark (`ila.evaluation.benchmarks`, data shipped in `ila/data/sets/`): `truthfulqa`
  (TruthfulQA MC1, 817 questions), `harmless` (hh-rlhf harmless-base preference accuracy on the held-out test
  split) or `bbh` / `bbh:TASK[,TASK...]` (BIG-Bench-Hard examples that list their options; per-task scores);
* `bigbench:TASK[/SUBTASK_GLOB,...]` for any BIG-bench JSON task whose examples have `target_scores`, read
  from the archive `$ILA_BIGBENCH` points to (`ila.assets.bigbench_archive`);
* a local `.json`/`.jsonl` file: a BIG-bench `task.json` (a dict with `examples`), or a list / JSON lines of
  examples, each either `{"input", "target_scores": {choice: score}}` or
  `{"question", "choices": [...], "answer": index | [indices] | choice}`;
* a local lm-eval task config `.yaml`, or an lm-eval registry name (`mmlu`, `hellaswag`, ...), which loads
  its data from the Hugging Face hub (an `IlaError` when that is unreachable).

Embedded, BIG-bench and local-file tasks are written once as JSON lines under `cache_dir()/lm_eval_tasks/` and
scored by lm-eval as `multiple_choice` tasks (log-likelihood of each choice after the prompt; `acc` and
`acc_norm`, the latter with the log-likelihood divided by the choice's length in characters).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ila import bigbench
from ila.errors import IlaError
from ila.evaluation import benchmarks
from ila.io import slug, write_bytes_atomic

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

REMOVED_TASKS = ("hhh_alignment", "truthful_qa")
"""Former short names of BIG-bench tasks, read from an archive that is no longer served; they now raise an IlaError
naming the embedded benchmarks and the `bigbench:` spec."""

TASK_DIR = "lm_eval_tasks"
"""Folder under `cache_dir()` that holds the generated JSON-lines task files."""

DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
"""BIG-bench's defaults for `example_input_prefix`, `example_output_prefix` and `choice_prefix`."""

_TRUTHFUL_QA_MC = "truthful_qa/task_mc.json"
_LOCAL_SUFFIXES = (".json", ".jsonl")
_YAML_SUFFIXES = (".yaml", ".yml")
_INSTALL_HINT = "pip install 'ila[eval]'"


# ----------------------------------------------------------------------------------------------------------
# lm-eval import


def _import_lm_eval() -> tuple[Any, Any, Any]:
    """(lm_eval module, HFLM, TaskManager); IlaError with the install command when lm-eval is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise IlaError(f"multiple-choice evaluation needs lm-evaluation-harness, which is not installed "
                       f"({e}); install it with: {_INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


# ----------------------------------------------------------------------------------------------------------
# BIG-bench task files


def truthful_qa_mc_file() -> Path:
    """Path of BIG-bench's `truthful_qa/task_mc.json`, extracted once from the archive into the cache.

    truthful_qa is a programmatic BIG-bench task (no `task.json`); its multiple-choice data is `task_mc.json`:
    examples `{"input", "target_scores"}` (one true answer) and a `task_prefix` of six Q/A demonstrations.
    """
    return bigbench.member_file(_TRUTHFUL_QA_MC)


def bigbench_tasks(spec: str) -> list[tuple[str, Path, dict[str, Any]]]:
    """The `(subtask name, task file, task data)` triples of a `bigbench:TASK[/SUBTASK,...]` SPEC.

    Like `ila.bigbench.task_files`, plus `bigbench:truthful_qa`, whose data is `task_mc.json`.
    """
    task, selectors = bigbench.parse_spec(spec)
    if task == "truthful_qa":
        if selectors:
            raise IlaError(f"task {spec!r}: truthful_qa has no subtasks, use 'bigbench:truthful_qa'")
        files = [("truthful_qa", truthful_qa_mc_file())]
    else:
        files = bigbench.task_files(spec)
    return [(name, path, bigbench.read_task(path)) for name, path in files]


def bigbench_prompt(meta: Mapping[str, Any], text: str, choices: Sequence[str] = (), *, seed: int = 0) -> str:
    """BIG-bench's default prompt: `task_prefix + input_prefix + input [+ choices] + output_prefix`, stripped.

    META is the task.json (its `task_prefix`, `example_input_prefix` (default "\\nQ: "),
    `example_output_prefix` (default "\\nA: "), `choice_prefix` (default "\\n  choice: ") and
    `append_choices_to_input` (default true)). When choices are appended they are listed in a seeded random
    order, as BIG-bench does. Surrounding whitespace is stripped: lm-eval puts one space between the prompt
    and each scored choice.
    """
    prompt = str(meta.get("task_prefix", "")) + str(meta.get("example_input_prefix", DEFAULT_INPUT_PREFIX)) + text
    if choices and meta.get("append_choices_to_input", True):
        listed = sorted(choices)
        random.Random(seed).shuffle(listed)
        choice_prefix = str(meta.get("choice_prefix", DEFAULT_CHOICE_PREFIX))
        prompt += "".join(choice_prefix + c for c in listed)
    prompt += str(meta.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX))
    return prompt.strip()


def _gold_indices(scores: Sequence[float]) -> list[int]:
    best = max(scores)
    return [i for i, s in enumerate(scores) if s == best]


def _doc_from_scores(meta: Mapping[str, Any], ex: Any, subtask: str, rng: random.Random, seed: int,
                     where: str) -> dict[str, Any] | None:
    """One lm-eval doc from a BIG-bench example with `target_scores`; None when it has no usable choices."""
    if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
        return None
    scores = ex.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
        raise IlaError(f"{where}: field 'target_scores' has a non-numeric score, expected numbers")
    if max(scores.values()) <= min(scores.values()):
        return None  # no choice scores higher than another: nothing to get right
    choices = [str(c) for c in scores]
    order = list(range(len(choices)))
    rng.shuffle(order)  # hhh_alignment lists the correct answer first; a tie must not favour it
    choices = [choices[i] for i in order]
    values = [float(list(scores.values())[i]) for i in order]
    gold = _gold_indices(values)
    return {"query": bigbench_prompt(meta, ex["input"], choices, seed=seed), "choices": choices, "gold": gold,
            "answer": choices[gold[0]], "subtask": subtask}


def _docs_from_task(name: str, data: Mapping[str, Any], seed: int, where: str) -> list[dict[str, Any]]:
    rng = random.Random(f"{seed}:{name}")
    docs, skipped = [], 0
    for i, ex in enumerate(data["examples"]):
        doc = _doc_from_scores(data, ex, name, rng, seed, f"{where}: example {i}")
        if doc is None:
            skipped += 1
        else:
            docs.append(doc)
    if skipped and docs:
        log.warning("%s: skipped %d of %d examples without a usable 'target_scores'", where, skipped,
                    len(data["examples"]))
    return docs


def _native_doc(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A `{"question", "choices", "answer"}` row (also `query` / `gold`) as an lm-eval doc, choices in order."""
    query = row.get("question", row.get("query"))
    if not isinstance(query, str) or not query.strip():
        raise IlaError(f"{where}: field 'question' missing or not a non-empty string")
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise IlaError(f"{where}: field 'choices' is {str(choices)[:40]!r}, expected a list of >= 2 strings")
    answer = row.get("answer", row.get("gold"))
    if isinstance(answer, str):
        if answer not in choices:
            raise IlaError(f"{where}: field 'answer' {answer[:40]!r} is not one of the choices")
        gold = [choices.index(answer)]
    elif isinstance(answer, int) and not isinstance(answer, bool):
        gold = [answer]
    elif isinstance(answer, list) and answer and all(isinstance(a, int) and not isinstance(a, bool)
                                                     for a in answer):
        gold = sorted(set(answer))
    else:
        raise IlaError(f"{where}: field 'answer' is {answer!r}, expected a choice index, a list of indices "
                       "or one of the choices")
    if any(not 0 <= g < len(choices) for g in gold):
        raise IlaError(f"{where}: field 'answer' {answer!r} is out of range for {len(choices)} choices")
    return {"query": query.strip(), "choices": choices, "gold": gold, "answer": choices[gold[0]],
            "subtask": str(row.get("subtask", ""))}


def _file_docs(path: Path, seed: int) -> list[dict[str, Any]]:
    """lm-eval docs from a local `.json`/`.jsonl` multiple-choice file (see the module docstring)."""
    if not path.is_file():
        raise IlaError(f"{path}: multiple-choice task file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IlaError(f"{path}: cannot read ({e})") from None
    rows: list[tuple[str, Any]] = []
    meta: Mapping[str, Any] = {}
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{path}: line {lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise IlaError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IlaError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("examples"), list):
            meta = data
            rows = [(f"{path}: example {i}", ex) for i, ex in enumerate(data["examples"])]
        elif isinstance(data, list):
            rows = [(f"{path}: row {i}", ex) for i, ex in enumerate(data)]
        else:
            raise IlaError(f"{path}: expected a BIG-bench task (a dict with 'examples') or a list of examples")
    rng = random.Random(f"{seed}:{path.name}")
    docs = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise IlaError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "target_scores" in row:
            doc = _doc_from_scores(meta, row, str(row.get("subtask", "")), rng, seed, where)
            if doc is None:
                raise IlaError(f"{where}: 'input' must be a string and 'target_scores' must have >= 2 choices "
                               "with one scoring higher than another")
            docs.append(doc)
        elif "choices" in row:
            docs.append(_native_doc(row, where))
        else:
            raise IlaError(f"{where}: expected 'input' + 'target_scores' (BIG-bench form) or 'question' + "
                           f"'choices' + 'answer'; fields present: {', '.join(sorted(row)) or 'none'}")
    if not docs:
        raise IlaError(f"{path}: no examples")
    return docs


def check_removed(spec: str) -> None:
    """A one-line IlaError for the former ready names `hhh_alignment` / `truthful_qa` (`REMOVED_TASKS`)."""
    if spec in REMOVED_TASKS:
        raise IlaError(f"task {spec!r}: removed with the BIG-bench download; use an embedded benchmark "
                       f"({', '.join(benchmarks.MC_BENCHMARKS)}), or 'bigbench:{spec}' with "
                       "ILA_BIGBENCH pointing at a bigbench-1.0.0.tar.gz archive")


def mc_docs(spec: str, *, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The lm-eval docs (`query`, `choices`, `gold` indices, `answer`, `subtask`) of an embedded benchmark,
    BIG-bench or file SPEC.

    LIMIT keeps a seeded random subset spread evenly over the subtasks (each keeps its order).
    """
    check_removed(spec)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise IlaError(f"limit is {limit!r}, expected a positive integer or None")
    if benchmarks.is_mc_benchmark(spec):
        groups = benchmarks.mc_groups(spec, seed)
    elif spec.startswith(bigbench.PREFIX):
        groups = [_docs_from_task(name, data, seed, f"bigbench {name} ({path.name})")
                  for name, path, data in bigbench_tasks(spec)]
        if not any(groups):
            raise IlaError(f"task {spec!r}: no examples with 'target_scores' (not a multiple-choice task); "
                           "use exact_match for tasks with text targets")
    else:
        docs = _file_docs(Path(spec).expanduser(), seed)
        by_subtask: dict[str, list[dict[str, Any]]] = {}
        for doc in docs:
            by_subtask.setdefault(doc["subtask"], []).append(doc)
        groups = list(by_subtask.values())
    if limit is None:
        return [d for g in groups for d in g]
    return bigbench.sample_evenly(groups, limit, seed)


def write_task_file(name: str, docs: Sequence[Mapping[str, Any]]) -> Path:
    """Write DOCS as JSON lines under `cache_dir()/lm_eval_tasks/`, named by NAME and a content hash."""
    from ila.assets import cache_dir

    data = "".join(json.dumps(dict(d), ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    stem = slug(name, keep="", empty="task")
    path = cache_dir() / TASK_DIR / f"{stem}-{hashlib.sha256(data).hexdigest()[:12]}.jsonl"
    if not path.is_file():
        write_bytes_atomic(path, data)
    return path


def task_config(task_name: str, data_file: Path) -> dict[str, Any]:
    """The lm-eval task config (a dict) of a JSON-lines file of docs written by `write_task_file`.

    Few-shot examples, when asked for, come from the same file (lm-eval leaves out the doc being scored).
    """
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "fewshot_split": "test",
        "fewshot_config": {"sampler": "default", "doc_to_target": "answer"},
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def _kind(spec: str) -> str:
    if benchmarks.is_mc_benchmark(spec):
        return "embedded"
    if spec.startswith(bigbench.PREFIX):
        return "bigbench"
    suffix = Path(spec).suffix.lower()
    if suffix in _LOCAL_SUFFIXES:
        return "file"
    if suffix in _YAML_SUFFIXES:
        return "yaml"
    return "lm-eval"


def _metric(row: Mapping[str, Any], name: str) -> float | None:
    value = row.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _subtask_scores(samples: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | int]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        groups.setdefault(str(s.get("doc", {}).get("subtask", "")), []).append(s)
    if len(groups) < 2:
        return {}
    return {name: {"accuracy": sum(float(s["acc"]) for s in g) / len(g),
                   "acc_norm": sum(float(s["acc_norm"]) for s in g) / len(g), "n": len(g)}
            for name, g in sorted(groups.items())}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_registry(tm: Any, spec: str) -> dict[str, Any]:
    from ila.models import hub_offline_when_unreachable

    try:
        with hub_offline_when_unreachable():
            return tm.load([spec])
    except KeyError:
        import difflib

        close = difflib.get_close_matches(spec, tm.all_tasks, n=5, cutoff=0.6)
        hint = f"; close lm-eval names: {', '.join(close)}" if close else ""
        raise IlaError(f"task {spec!r}: not an embedded benchmark ({', '.join(benchmarks.MC_BENCHMARKS)}), a "
                       f"'bigbench:TASK' spec, a .json/.jsonl/.yaml file or an lm-eval task{hint}") from None
    except Exception as e:  # dataset loading raises many types (connection, offline mode, builder errors)
        raise IlaError(f"task {spec!r}: lm-eval could not load it ({_first_line(e)}); registry tasks read their "
                       "data from the Hugging Face hub, which must be reachable (or hold them in its local "
                       "cache)") from None


def _registry_task(task_manager_cls: Any, spec: str) -> tuple[Any, dict[str, Any]]:
    """(TaskManager, loaded tasks) for an lm-eval registry name. Indexing all ~14k lm-eval tasks takes 6 s or
    more, so a name with its own folder under `lm_eval/tasks/` (mmlu, hellaswag, ...) is first looked up by
    indexing that folder alone."""
    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / spec
    if re.fullmatch(r"[A-Za-z0-9_\-]+", spec) and folder.is_dir():
        tm = task_manager_cls(include_path=str(folder), include_defaults=False)
        if spec in tm.all_tasks:
            return tm, _load_registry(tm, spec)
    tm = task_manager_cls()
    return tm, _load_registry(tm, spec)


def _top_objects(loaded: Mapping[str, Any]) -> tuple[list[Any], str | None]:
    """The top-level Task/Group objects lm-eval loaded, and the name of the row that sums them up (the single
    top-level group or task), or None when there are several (a tag)."""
    groups = loaded.get("groups") or {}
    children = {c for kids in (loaded.get("group_map") or {}).values() for c in kids}
    tops = [g for name, g in groups.items() if name not in children]
    grouped = {t.task_name for g in tops for t in g.get_all_tasks()}
    tops += [t for name, t in loaded["tasks"].items() if name not in grouped]
    if len(tops) != 1:
        return tops, None
    return tops, getattr(tops[0], "name", None) or getattr(tops[0], "task_name", None)


def _run(lm_eval: Any, lm: Any, tm: Any, objects: list[Any], **kwargs: Any) -> dict[str, Any]:
    out = lm_eval.simple_evaluate(
        model=lm, tasks=objects, task_manager=tm, bootstrap_iters=1000, log_samples=True,
        random_seed=None, numpy_random_seed=None, torch_random_seed=None, **kwargs)
    if out is None:
        raise IlaError("lm-eval returned no results (not the main process of a distributed run)")
    return out


def _registry_summary(out: Mapping[str, Any], spec: str, top: str | None, leaves: Sequence[str]) -> dict[str, Any]:
    results, counts = out["results"], out.get("n-samples", {})
    n = sum(int(counts.get(t, {}).get("effective", 0)) for t in leaves)
    row = results.get(top, {}) if top else {}
    acc, acc_norm = _metric(row, "acc"), _metric(row, "acc_norm")
    if acc is None:  # no aggregate row: weight each leaf task by its number of examples
        rows = [(results.get(t, {}), int(counts.get(t, {}).get("effective", 0))) for t in leaves]
        if n and all(_metric(r, "acc") is not None for r, _ in rows):
            acc = sum(_metric(r, "acc") * k for r, k in rows) / n  # type: ignore[operator]
        if n and all(_metric(r, "acc_norm") is not None for r, _ in rows):
            acc_norm = sum(_metric(r, "acc_norm") * k for r, k in rows) / n  # type: ignore[operator]
    if acc is None:
        raise IlaError(f"task {spec!r}: lm-eval reported no 'acc' metric (is it a multiple-choice task?)")
    return {"accuracy": acc, "acc_norm": acc_norm, "n": n, "accuracy_stderr": _metric(row, "acc_stderr"),
            "source": "lm-eval", "lm_eval_task": top or ",".join(leaves)}


def multiple_choice(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], *,
                    limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = 0, seed: int = 0,
                    chat_template: bool = False) -> dict[str, dict[str, Any]]:
    """Multiple-choice accuracy of an in-memory MODEL (a PeftModel too) on each of TASKS, via lm-eval.

    TASKS: embedded benchmarks, `bigbench:` specs, local files or lm-eval task names (module docstring).
    LIMIT: at most this many examples per task (a seeded subset, spread over subtasks, for embedded, BIG-bench
    and file tasks; lm-eval's first-N for registry tasks). NUM_FEWSHOT: demonstrations before each question
    (None: the task's own default, e.g. for a registry task configured with one). CHAT_TEMPLATE wraps prompts
    in the tokenizer's chat template (lm-eval's `apply_chat_template`). The model's train/eval mode is restored
    afterwards; global RNGs are not reseeded.

    Returns, per task spec: `accuracy` (lm-eval `acc`), `acc_norm`, `n`, `accuracy_stderr`, `source` (embedded,
    bigbench, file, yaml or lm-eval), `lm_eval_task`, for local tasks `data_file`, and `subtasks` (per-subtask
    scores, e.g. per BBH task) when there are several.
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise IlaError(f"tasks is {tasks!r}, expected a non-empty list of task names")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise IlaError(f"limit is {limit!r}, expected a positive integer or None")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise IlaError(f"batch_size is {batch_size!r}, expected a positive integer")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise IlaError(f"num_fewshot is {num_fewshot!r}, expected an integer >= 0 or None")
    if len(set(tasks)) != len(tasks):
        raise IlaError(f"tasks {list(tasks)!r} name a task twice")
    for spec in tasks:
        check_removed(spec)
    lm_eval, HFLM, TaskManager = _import_lm_eval()

    # Build local task files first, so bad specs fail before any model work.
    local: dict[str, tuple[str, Path]] = {}
    for spec in tasks:
        if _kind(spec) in ("embedded", "bigbench", "file"):
            docs = mc_docs(spec, limit=limit, seed=seed)
            name = "ila_" + slug(spec, keep="", empty="task")
            while name in {n for n, _ in local.values()}:
                name += "_"
            local[spec] = (name, write_task_file(name, docs))

    results: dict[str, dict[str, Any]] = {}
    was_training = model.training
    common = {"num_fewshot": num_fewshot, "fewshot_random_seed": seed, "apply_chat_template": chat_template,
              "fewshot_as_multiturn": chat_template}
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)  # puts the model in eval mode
        if local:
            tm = TaskManager(include_defaults=False)
            configs = [task_config(name, path) for name, path in local.values()]
            try:
                loaded = tm.load(configs)
            except Exception as e:  # lm-eval and datasets raise many types
                files = ", ".join(str(path) for _, path in local.values())
                raise IlaError(f"lm-eval could not load the local task file(s) {files} ({_first_line(e)})") from None
            out = _run(lm_eval, lm, tm, list(loaded["tasks"].values()), **common)
            for spec, (name, path) in local.items():
                row = out["results"][name]
                samples = out.get("samples", {}).get(name, [])
                entry: dict[str, Any] = {
                    "accuracy": _metric(row, "acc"), "acc_norm": _metric(row, "acc_norm"),
                    "n": int(out.get("n-samples", {}).get(name, {}).get("effective", len(samples))),
                    "accuracy_stderr": _metric(row, "acc_stderr"), "source": _kind(spec),
                    "lm_eval_task": name, "data_file": str(path)}
                subtasks = _subtask_scores(samples)
                if subtasks:
                    entry["subtasks"] = subtasks
                results[spec] = entry
        for spec in tasks:
            kind = _kind(spec)
            if kind not in ("lm-eval", "yaml"):
                continue
            if kind == "yaml" and not Path(spec).expanduser().is_file():
                raise IlaError(f"{spec}: lm-eval task config not found")
            if kind == "yaml":
                tm = TaskManager(include_defaults=False)
                loaded = _load_registry(tm, str(Path(spec).expanduser()))
            else:
                tm, loaded = _registry_task(TaskManager, spec)
            objects, top = _top_objects(loaded)
            out = _run(lm_eval, lm, tm, objects, limit=limit, **common)
            results[spec] = _registry_summary(out, spec, top, list(loaded["tasks"]))
            if kind == "yaml":
                results[spec]["source"] = "yaml"
    finally:
        model.train(was_training)
    return {spec: results[spec] for spec in tasks}
