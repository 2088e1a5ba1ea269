"""Generative exact match: greedy answers to reasoning-style prompts compared with the reference answers.

Prompts go through `ila.data.render_prompt` (the tokenizer's chat template when it has one, else the plain
`### Instruction:` template) and are tokenised as in training, so a fine-tuned model sees its training format.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ila import bigbench
from ila.errors import IlaError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

TRAILING_PUNCTUATION = ".,!?;:"
"""Characters `normalise_answer` strips from the end of an answer (with any whitespace between them)."""

BIGBENCH_DEFAULT_REGEX = r"[^\.\?\!\;\n]+"
"""BIG-bench's answer extraction when a task sets neither `output_regex` nor `stop_string`."""


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
                          "subtask": name})
        groups.append(items)
    if not any(groups):
        raise IlaError(f"data {spec!r}: no examples with a text 'target' or 'target_scores'")
    return groups


def exact_match_items(spec: str, *, limit: int | None = 50, seed: int = 0) -> list[dict[str, Any]]:
    """Items (`messages` = the prompt, `targets` = accepted answers, ...) of SPEC for `exact_match`.

    SPEC: `bigbench:TASK[/SUBTASK,...]` (targets: `target`, a string or a list of accepted strings; for
    examples with only `target_scores`, the best-scoring choices, with the choices appended to the prompt as
    BIG-bench does), or anything `ila.data.load_examples` reads (target: the response). LIMIT: a seeded
    subset, spread evenly over BIG-bench subtasks.
    """
    from ila.data import load_examples

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise IlaError(f"limit is {limit!r}, expected a positive integer or None")
    if str(spec).startswith(bigbench.PREFIX):
        groups = _bigbench_items(spec, seed)
        return [x for g in groups for x in g] if limit is None else bigbench.sample_evenly(groups, limit, seed)
    examples = load_examples(spec, max_examples=limit, seed=seed)
    if any("text" in ex for ex in examples):
        raise IlaError(f"exact match on {spec}: text rows have no prompt and target; expected alpaca, messages or "
                       "conversations rows")
    return [{"messages": ex["messages"][:-1], "targets": [ex["messages"][-1]["content"]], "output_regex": None,
             "stop_string": None, "subtask": ""} for ex in examples]


def exact_match(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: str, *, limit: int | None = 50,
                max_new_tokens: int = 32, seed: int = 0, batch_size: int = 8,
                show: int = 5) -> dict[str, Any]:
    """Greedy generation on SPEC (see `exact_match_items`) scored against the reference answers.

    An answer counts when its normalised form (`normalise_answer`) equals the normalised form of any target:
    `exact_match` compares the whole output, `first_line_match` the first non-blank line of the output,
    `bigbench_match` the part BIG-bench's own post-processing keeps (`bigbench_extract` with the task's
    `output_regex`/`stop_string`; local files use the default regex). Returns those three rates, `n`, and the
    first SHOW `examples` (prompt, output, targets, match flags).
    """
    from ila.data import render_prompt

    items = exact_match_items(spec, limit=limit, seed=seed)
    prompts = [render_prompt(item["messages"], tokenizer) for item in items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = {"exact_match": 0, "first_line_match": 0, "bigbench_match": 0}
    examples = []
    for item, prompt, output in zip(items, prompts, outputs):
        targets = {normalise_answer(t) for t in item["targets"]}
        extracted = bigbench_extract(output, output_regex=item["output_regex"], stop_string=item["stop_string"])
        flags = {"exact_match": normalise_answer(output) in targets,
                 "first_line_match": normalise_answer(first_line(output)) in targets,
                 "bigbench_match": normalise_answer(extracted) in targets}
        for key, ok in flags.items():
            hits[key] += ok
        if len(examples) < show:
            examples.append({"prompt": prompt, "output": output, "targets": item["targets"], **flags})
    n = len(items)
    return {**{key: count / n for key, count in hits.items()}, "n": n, "spec": spec, "examples": examples}
