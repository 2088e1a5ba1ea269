"""Generative exact match: greedy answers to reasoning-style prompts compared with the reference answers.

Specs: the embedded benchmarks `gsm8k` (test split; the last number of the output against the number after
`####`) and `bbh` / `bbh:TASK[,TASK...]` (BIG-Bench-Hard examples without listed options), `bigbench:` specs
(an archive `$ILA_BIGBENCH` points to), or anything `ila.data.load_examples` reads. Prompts go through
`ila.data.render_prompt` (the tokenizer's chat template when it has one, else the plain `### Instruction:`
template) and are tokenised as in training, so a fine-tuned model sees its training format.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ila import bigbench
from ila.errors import IlaError
from ila.evaluation import benchmarks

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

TRAILING_PUNCTUATION = ".,!?;:"
"""Characters `normalise_answer` strips from the end of an answer (with any whitespace between them)."""

BIGBENCH_DEFAULT_REGEX = r"[^\.\?\!\;\n]+"
"""BIG-bench's answer extraction when a task sets neither `output_regex` nor `stop_string`."""

EXTRACTIONS = {
    "regex": "BIG-bench post-processing: cut at the task's stop_string, keep the first match of its output_regex "
             "(default [^.?!;\\n]+, the text up to the first sentence end)",
    "last_number": "the last number in the output (commas, $ and a trailing .0 dropped)",
}
"""How `extracted_match` reads an answer off an output, by an item's `extract` field."""

DEFAULT_MAX_NEW_TOKENS = 32
"""Generation length when neither the caller nor the benchmark (`benchmarks.MAX_NEW_TOKENS`) sets one."""


def normalise_answer(text: str) -> str:
    """Lower-case TEXT, collapse every whitespace run to one space, strip both ends, then strip trailing
    `.,!?;:` characters (and whitespace between them). `" The  Answer is 42.\\n"` -> `"the answer is 42"`."""
    return " ".join(str(text).split()).lower().rstrip(TRAILING_PUNCTUATION + " ")


def first_line(text: str) -> str:
    """The first line of TEXT that is not blank (empty string if there is none)."""
    return next((line for line in str(text).splitlines() if line.strip()), "")


def bigbench_extract(text: str, *, output_regex: str | None = None, stop_string: str | None = None) -> str:
    """BIG-bench's post-processing of a generated answer: cut at STOP_STRING, then keep the first match of
    OUTPUT_REGEX (`BIGBENCH_DEFAULT_REGEX` when the task sets neither); "" when nothing matches."""
    if stop_string:
        text = text.split(stop_string, 1)[0]
    regex = output_regex or (None if stop_string else BIGBENCH_DEFAULT_REGEX)
    if regex is None:
        return text
    match = re.search(regex, text)
    return match.group(0) if match else ""


def extract_answer(text: str, item: Mapping[str, Any]) -> str:
    """The answer `extracted_match` compares: the last number of TEXT for an item with `extract: "last_number"`
    ("" when there is none), else `bigbench_extract` with the item's `output_regex` / `stop_string`."""
    if item.get("extract") == "last_number":
        from ila.data.embedded import last_number

        return last_number(text) or ""
    return bigbench_extract(text, output_regex=item.get("output_regex"), stop_string=item.get("stop_string"))


# ----------------------------------------------------------------------------------------------------------
# Generation


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
             max_new_tokens: int = 32, batch_size: int = 8) -> list[str]:
    """Greedy continuations of already-rendered PROMPTS (left-padded batches), cut at the first EOS.

    EOS is the tokenizer's eos token or any of the model's `generation_config.eos_token_id`. The model's
    train/eval mode is restored afterwards.
    """
    import torch

    from ila.data import prompt_ids

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise IlaError(f"max_new_tokens is {max_new_tokens!r}, expected a positive integer")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise IlaError(f"batch_size is {batch_size!r}, expected a positive integer")
    eos_ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        eos_ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    device = next(model.parameters()).device
    encoded = [prompt_ids(p, tokenizer) for p in prompts]
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start:start + batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=1, pad_token_id=pad,
                                     eos_token_id=sorted(eos_ids) or None)
                for row in out[:, width:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
                    outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


# ----------------------------------------------------------------------------------------------------------
# Examples


def _targets_of(ex: Mapping[str, Any]) -> tuple[list[str], bool]:
    """(reference answers, whether they came from `target_scores`) of a BIG-bench example."""
    target = ex.get("target")
    if isinstance(target, str) and target.strip():
        return [target], False
    if isinstance(target, list):
        texts = [t for t in target if isinstance(t, str) and t.strip()]
        if texts:
            return texts, False
    scores = ex.get("target_scores")
    if isinstance(scores, dict) and scores and all(isinstance(v, (int, float)) for v in scores.values()):
        best = max(scores.values())
        if len(scores) == 1 or best > min(scores.values()):
            return [str(c) for c, s in scores.items() if s == best], True
    return [], False


def _bigbench_items(spec: str, seed: int) -> list[list[dict[str, Any]]]:
    """Per subtask, the items (`messages`, `targets`, `output_regex`, `stop_string`) of a `bigbench:` SPEC."""
    from ila.data import PLAIN_SEPARATOR
    from ila.evaluation.multiple_choice import DEFAULT_CHOICE_PREFIX, bigbench_tasks

    task, _ = bigbench.parse_spec(spec)
    groups = []
    for name, _path, data in bigbench_tasks(spec):
        prefix = str(data.get("task_prefix", ""))
        if task == "natural_instructions" and isinstance(data.get("description"), str):
            prefix = data["description"].strip() + PLAIN_SEPARATOR + prefix  # as ila.data builds training data
        input_prefix = str(data.get("example_input_prefix", ""))  # BIG-bench's "\nQ: " default is left out
        rng = random.Random(f"{seed}:{name}")
        items = []
        for ex in data["examples"]:
            if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
                continue
            targets, from_scores = _targets_of(ex)
            if not targets:
                continue
            text = prefix + input_prefix + ex["input"]
            if from_scores and data.get("append_choices_to_input", True):
                choices = sorted(str(c) for c in ex["target_scores"])
                rng.shuffle(choices)
                text += "".join(str(data.get("choice_prefix", DEFAULT_CHOICE_PREFIX)) + c for c in choices)
            items.append({"messages": [{"role": "user", "content": text.strip()}], "targets": targets,
                          "output_regex": data.get("output_regex"), "stop_string": data.get("stop_string"),
                          "extract": "regex", "subtask": name})
        groups.append(items)
    if not any(groups):
        raise IlaError(f"data {spec!r}: no examples with a text 'target' or 'target_scores'")
    return groups


def exact_match_items(spec: str, *, limit: int | None = 50, seed: int = 0) -> list[dict[str, Any]]:
    """Items (`messages` = the prompt, `targets` = accepted answers, `extract`, `output_regex`, `stop_string`,
    `subtask`) of SPEC for `exact_match`.

    SPEC: `gsm8k` (the test split; target: the number after `####`, read off the output as its last number),
    `bbh` / `bbh:TASK[,TASK...]` (the BBH examples without an `Options:` block, decided per example; target: the
    BBH target), `bigbench:TASK[/SUBTASK,...]` (targets: `target`, a string or a list of accepted strings; for
    examples with only `target_scores`, the best-scoring choices, with the choices appended to the prompt as
    BIG-bench does), or anything `ila.data.load_examples` reads (target: the response). LIMIT: a seeded
    subset, spread evenly over BBH tasks and BIG-bench subtasks.
    """
    from ila.data import load_examples

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise IlaError(f"limit is {limit!r}, expected a positive integer or None")
    groups = None
    if benchmarks.is_exact_benchmark(str(spec)):
        groups = benchmarks.exact_groups(spec)
    elif str(spec).startswith(bigbench.PREFIX):
        groups = _bigbench_items(spec, seed)
    if groups is not None:
        return [x for g in groups for x in g] if limit is None else bigbench.sample_evenly(groups, limit, seed)
    examples = load_examples(spec, max_examples=limit, seed=seed)
    if any("text" in ex for ex in examples):
        raise IlaError(f"exact match on {spec}: text rows have no prompt and target; expected alpaca, messages or "
                       "conversations rows")
    return [{"messages": ex["messages"][:-1], "targets": [ex["messages"][-1]["content"]], "output_regex": None,
             "stop_string": None, "extract": "regex", "subtask": ""} for ex in examples]


METRICS = ("exact_match", "first_line_match", "extracted_match")
"""The three rates `exact_match` reports."""


def _rates(flags: Sequence[Mapping[str, bool]]) -> dict[str, float]:
    return {key: sum(f[key] for f in flags) / len(flags) for key in METRICS}


def exact_match(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: str, *, limit: int | None = 50,
                max_new_tokens: int | None = None, seed: int = 0, batch_size: int = 8,
                show: int = 5) -> dict[str, Any]:
    """Greedy generation on SPEC (see `exact_match_items`) scored against the reference answers.

    An answer counts when its normalised form (`normalise_answer`) equals the normalised form of any target:
    `exact_match` compares the whole output, `first_line_match` the first non-blank line of the output,
    `extracted_match` the answer `extract_answer` reads off it (GSM8K: the last number; otherwise BIG-bench's
    post-processing with the task's `output_regex`/`stop_string`, the default regex for other specs).
    MAX_NEW_TOKENS: None takes the benchmark's default (`benchmarks.MAX_NEW_TOKENS`: gsm8k 256, bbh 64), else 32.
    Returns those three rates, `n`, `spec`, `extraction` (how `extracted_match` reads answers), `subtasks`
    (the rates and `n` per subtask, e.g. per BBH task, when there are several) and the first SHOW `examples`
    (prompt, output, extracted answer, targets, match flags).
    """
    from ila.data import render_prompt

    if max_new_tokens is None:
        max_new_tokens = benchmarks.MAX_NEW_TOKENS.get(benchmarks.benchmark_name(str(spec)), DEFAULT_MAX_NEW_TOKENS)
    items = exact_match_items(spec, limit=limit, seed=seed)
    if not items:
        raise IlaError(f"exact match on {spec}: no examples")
    prompts = [render_prompt(item["messages"], tokenizer) for item in items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    flags, examples = [], []
    for item, prompt, output in zip(items, prompts, outputs):
        targets = {normalise_answer(t) for t in item["targets"]}
        extracted = extract_answer(output, item)
        flag = {"exact_match": normalise_answer(output) in targets,
                "first_line_match": normalise_answer(first_line(output)) in targets,
                "extracted_match": normalise_answer(extracted) in targets}
        flags.append(flag)
        if len(examples) < show:
            examples.append({"prompt": prompt, "output": output, "extracted": extracted, "targets": item["targets"],
                             **flag})
    by_subtask: dict[str, list[Mapping[str, bool]]] = {}
    for item, flag in zip(items, flags):
        by_subtask.setdefault(str(item.get("subtask", "")), []).append(flag)
    result: dict[str, Any] = {**_rates(flags), "n": len(items), "spec": spec,
                              "extraction": EXTRACTIONS[items[0].get("extract", "regex")]}
    if len(by_subtask) > 1:
        result["subtasks"] = {name: {**_rates(f), "n": len(f)} for name, f in sorted(by_subtask.items())}
    result["examples"] = examples
    return result
