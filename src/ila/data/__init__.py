"""Fine-tuning data: load examples, tokenise them with loss masking, split off a held-out set.

An example is `{"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", "content": ...}]}`:
the last message is the response, everything before it is the prompt; or `{"text": ...}`, plain text whose
every token is learned (continued pre-training, TRL's text datasets). Sources (see docs/data.md):

* the name of a set that ships inside ila (`ila.data.embedded`: gsm8k, roleplay, codegen, harmless);
* a local `.json` (a list) or `.jsonl` file in alpaca form (`instruction`, optional `input`, `output` or
  `response`), messages form (`messages`), LIMA form (`conversations`: alternating user/assistant strings),
  question form (`question`, `answer`), dialogue form (`chosen`: an hh-rlhf '\n\nHuman: … \n\nAssistant: …'
  dialogue) or text form (`text`);
* `bigbench:TASK[/SUBTASK,...]`, read from a BIG-bench archive the user points to (`ila.bigbench`);
* a directory of data files or a Hugging Face dataset name, via `datasets.load_dataset`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset

from ila import bigbench
from ila.data import embedded
from ila.errors import IlaError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_DATA = "gsm8k"
"""The embedded GSM8K train split: 7 473 grade-school maths questions with worked solutions."""

IGNORE_INDEX = -100
"""Label value the loss ignores (prompt tokens and padding)."""

PLAIN_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
"""Header before each message in the plain template; any other role R gets `### R:` (capitalised)."""
PLAIN_SEPARATOR = "\n\n"
"""Text after each message's content in the plain template."""
PLAIN_GENERATION_PROMPT = PLAIN_HEADERS["assistant"]
"""Text that ends a plain-template prompt; the response follows it directly."""
PLAIN_TEMPLATE = PLAIN_HEADERS["user"] + "{instruction}" + PLAIN_SEPARATOR + PLAIN_GENERATION_PROMPT
"""The plain prompt for a single user message, used when the tokenizer has no chat template."""

_LOCAL_SUFFIXES = (".json", ".jsonl")

Example = dict[str, Any]  # {"messages": [...]} or {"text": str}


class MalformedRow(IlaError):
    """A row that is counted and skipped rather than fatal (a dialogue that does not parse)."""


# ----------------------------------------------------------------------------------------------------------
# Row normalisation (shared by local files and `datasets` rows)


def _row_to_example(row: Any, where: str) -> Example | None:
    """Normalise one row to `{"messages": [...]}` or `{"text": ...}`; None when its response (or text) is empty.
    WHERE names the row."""
    if not isinstance(row, dict):
        raise IlaError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "text" in row and not {"messages", "conversations", "instruction", "output", "response"} & set(row):
        if not isinstance(row["text"], str):
            raise IlaError(f"{where}: field 'text' is {type(row['text']).__name__} {_short(row['text'])}, "
                           "expected a string")
        return {"text": row["text"]} if row["text"].strip() else None
    if "messages" in row:
        messages = _check_messages(row["messages"], f"{where}: field 'messages'")
    elif "conversations" in row:
        messages = _conversations_to_messages(row["conversations"], f"{where}: field 'conversations'")
    elif "instruction" in row or "output" in row or "response" in row:
        messages = _alpaca_to_messages(row, where)
    elif "question" in row and "answer" in row:
        messages = _alpaca_to_messages({"instruction": row["question"], "output": row["answer"]}, where)
    elif "chosen" in row:
        messages = embedded.dialogue_messages(row["chosen"])
        if messages is None:
            raise MalformedRow(f"{where}: field 'chosen' is not a '\\n\\nHuman: … \\n\\nAssistant: …' dialogue "
                               "ending with an Assistant turn")
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise IlaError(f"{where}: missing field 'instruction' (alpaca form: instruction, input, output), "
                       f"'messages' (messages form), 'question' + 'answer', 'chosen' (dialogue form) or 'text' "
                       f"(text form); fields present: {keys}")
    return {"messages": messages} if messages[-1]["content"].strip() else None


def _alpaca_to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "output" not in row and "response" in row:  # GPTeacher names the response field 'response'
        row = {**row, "output": row["response"]}
    for field in ("instruction", "output"):
        if field not in row:
            raise IlaError(f"{where}: missing field {field!r} (alpaca form needs 'instruction' and 'output')")
    for field in ("instruction", "input", "output", "system"):
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            raise IlaError(f"{where}: field {field!r} is {type(value).__name__} {_short(value)}, "
                           "expected a string")
    prompt = PLAIN_SEPARATOR.join(p for p in (row["instruction"], row.get("input")) if p and p.strip())
    if not prompt.strip():
        raise IlaError(f"{where}: fields 'instruction' and 'input' are both empty, expected a prompt")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if row.get("system") and row["system"].strip():
        messages.insert(0, {"role": "system", "content": row["system"]})
    return messages


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise IlaError(f"{where} is {type(value).__name__}, expected a list of {{role, content}} objects")
    if len(value) < 2:
        raise IlaError(f"{where} has {len(value)} message(s), expected at least 2 "
                       "(a prompt and the response)")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise IlaError(f"{where}[{i}] is {type(msg).__name__}, expected a {{role, content}} object")
        for key in ("role", "content"):
            if key not in msg:
                raise IlaError(f"{where}[{i}]: missing field {key!r}")
            if not isinstance(msg[key], str):
                raise IlaError(f"{where}[{i}].{key} is {type(msg[key]).__name__} {_short(msg[key])}, "
                               "expected a string")
        out.append({"role": msg["role"], "content": msg["content"]})
    if out[-1]["role"] != "assistant":
        raise IlaError(f"{where}[{len(out) - 1}].role is {out[-1]['role']!r}, expected 'assistant' "
                       "(the last message is the response)")
    return out


def _conversations_to_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise IlaError(f"{where} is {_short(value)}, expected a list of strings (user, assistant, ...)")
    if len(value) < 2 or len(value) % 2:
        raise IlaError(f"{where} has {len(value)} turn(s), expected an even number >= 2 "
                       "(alternating user/assistant, ending with the response)")
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(value)]


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# Local files


def _read_local(path: Path) -> list[Example]:
    """Examples of a local `.json`/`.jsonl` file, validated row by row; empty responses are dropped."""
    if path.suffix.lower() not in _LOCAL_SUFFIXES:
        raise IlaError(f"{path}: unsupported file type {path.suffix or '(none)'!r}, expected .json or .jsonl")
    if not path.is_file():
        raise IlaError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise IlaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise IlaError(f"{path}: file is empty, expected JSON examples")
    rows: list[tuple[str, Any]] = []
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}: line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise IlaError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno}), "
                               "expected one JSON object per line") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IlaError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(data, list):
            raise IlaError(f"{path}: top level is a JSON {type(data).__name__}, expected a list of examples")
        rows = [(f"{path}: row {i}", row) for i, row in enumerate(data)]
    return _normalise_rows(rows, str(path))


def _normalise_rows(rows: Iterable[tuple[str, Any]], source: str) -> list[Example]:
    examples, empty, malformed, total = [], 0, 0, 0
    first_malformed = ""
    for where, row in rows:
        total += 1
        try:
            example = _row_to_example(row, where)
        except MalformedRow as e:
            malformed += 1
            first_malformed = first_malformed or str(e)
            continue
        if example is None:
            empty += 1
        else:
            examples.append(example)
    if empty:
        log.warning("%s: dropped %d of %d rows with an empty response", source, empty, total)
    if malformed:
        log.warning("%s: skipped %d of %d malformed rows (first: %s)", source, malformed, total, first_malformed)
    if not examples:
        what = ("no rows" if total == 0 else f"all {total} rows are malformed ({first_malformed})"
                if malformed == total else f"all {total} rows have an empty response or are malformed")
        raise IlaError(f"{source}: no usable examples ({what})")
    return examples


# ----------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _read_hf(name: str, max_examples: int | None, seed: int) -> list[Example]:
    """Examples from `datasets.load_dataset(name)` (its `train` split, else its first split); the hub names of
    the embedded sets get their arguments from `embedded.HUB_LOAD_ARGS`."""
    import datasets

    from ila.models import _offline, hub_offline_when_unreachable

    try:
        with hub_offline_when_unreachable():
            loaded = datasets.load_dataset(name, **embedded.HUB_LOAD_ARGS.get(name, {}))
    except Exception as e:  # the library raises many types (connection, not found, builder errors)
        if not Path(name).exists() and _offline():
            raise IlaError(f"data {name!r}: not an embedded set ({', '.join(_sft_names())}) nor a local file, and a "
                           "Hugging Face hub dataset needs the network, which is unreachable") from None
        reason = first_line(e)
        raise IlaError(f"data {name!r} is neither an embedded set ({', '.join(_sft_names())}), a local "
                       f".json/.jsonl file, a 'bigbench:TASK[/SUBTASK]' spec nor a dataset datasets.load_dataset "
                       f"can reach ({reason})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else sorted(loaded)[0]
        if split != "train":
            log.warning("%s: no 'train' split, using %r", name, split)
        ds = loaded[split]
    else:
        ds = loaded
    forms = ({"messages"}, {"conversations"}, {"instruction", "output"}, {"instruction", "response"},
             {"question", "answer"}, {"chosen"}, {"text"})
    if not any(form <= set(ds.column_names) for form in forms):
        raise IlaError(f"dataset {name!r}: columns {', '.join(ds.column_names)}; expected 'instruction' and "
                       "'output' (alpaca form), 'messages', 'conversations', 'question' and 'answer', 'chosen' "
                       "or 'text'")
    indices = list(range(len(ds)))
    if max_examples is not None and max_examples < len(indices):
        indices = sorted(random.Random(seed).sample(indices, max_examples))
    rows = ((f"dataset {name!r}: row {i}", ds[i]) for i in indices)
    return _normalise_rows(rows, f"dataset {name!r}")


# ----------------------------------------------------------------------------------------------------------
# Embedded sets


def _sft_names() -> list[str]:
    return [n for n, s in embedded.SETS.items() if s.kind == "sft"]


def _read_embedded(name: str, split: str = "train") -> list[Example]:
    """The examples of an embedded SFT set's SPLIT (its rows through the same forms as any file)."""
    rows = embedded.rows(name, split)
    return _normalise_rows(((f"embedded set {name!r} ({split}): row {i}", r) for i, r in enumerate(rows)),
                           f"embedded set {name!r}")


# ----------------------------------------------------------------------------------------------------------
# BIG-bench


def _bigbench_examples(task: str, name: str, path: Path) -> list[Example]:
    """Examples of one extracted task.json; natural_instructions get the subtask `description` first."""
    data = bigbench.read_task(path)
    raw = data["examples"]
    prefix = ""
    if task == "natural_instructions" and isinstance(data.get("description"), str):
        prefix = data["description"].strip() + PLAIN_SEPARATOR
    out, skipped = [], 0
    for ex in raw:
        target = _bigbench_target(ex)
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or target is None:
            skipped += 1
            continue
        out.append({"messages": [{"role": "user", "content": prefix + ex["input"]},
                                 {"role": "assistant", "content": target}]})
    if skipped:
        log.warning("bigbench %s: skipped %d of %d examples without a text input and target",
                    name, skipped, len(raw))
    return out


def _bigbench_target(ex: Any) -> str | None:
    """`target` (a string, or the first of a list), else the best-scoring `target_scores` choice."""
    if not isinstance(ex, dict):
        return None
    target = ex.get("target")
    if isinstance(target, list):
        target = next((t for t in target if isinstance(t, str) and t.strip()), None)
    if isinstance(target, str) and target.strip():
        return target
    scores = ex.get("target_scores")
    if isinstance(scores, dict) and scores:
        best = max(scores.values())
        return next(choice for choice, score in scores.items() if score == best)
    return None


def _read_bigbench(spec: str, max_examples: int | None, seed: int) -> list[Example]:
    task, _ = bigbench.parse_spec(spec)
    groups = [_bigbench_examples(task, name, path) for name, path in bigbench.task_files(spec)]
    if not any(groups):
        raise IlaError(f"data {spec!r}: the selected BIG-bench files hold no examples with a text target")
    if max_examples is None:
        return [ex for g in groups for ex in g]
    return bigbench.sample_evenly(groups, max_examples, seed)


# ----------------------------------------------------------------------------------------------------------
# Public loading API


def load_examples(spec: str | None = None, *, max_examples: int | None = None,
                  seed: int = 0) -> list[Example]:
    """Load examples (`{"messages": [...]}`, last message the response) from SPEC (default `DEFAULT_DATA`).

    SPEC: an embedded set's name (its train split), a `.json`/`.jsonl` file, `bigbench:TASK[/SUBTASK_GLOB,...]`,
    or a `datasets.load_dataset` name or directory. MAX_EXAMPLES keeps a seeded random subset (spread evenly over
    the selected BIG-bench subtasks).
    """
    spec = DEFAULT_DATA if spec is None else str(spec)
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise IlaError(f"max_examples is {max_examples!r}, expected a positive integer or None")
    if not spec.strip():
        raise IlaError(f"data spec is empty, expected an embedded set ({', '.join(_sft_names())}), a file, "
                       "'bigbench:TASK[/SUBTASK]' or a dataset name")
    if spec.startswith(bigbench.PREFIX):
        return _read_bigbench(spec, max_examples, seed)
    path = Path(spec).expanduser()
    looks_local = path.suffix.lower() in _LOCAL_SUFFIXES or spec.startswith((".", "/", "~"))
    if spec in embedded.SETS and not path.exists():
        examples = _read_embedded(spec)
    elif path.is_file() or (looks_local and not path.is_dir()):
        if not path.exists():
            raise IlaError(f"{path}: data file not found")
        examples = _read_local(path)
    else:
        return _read_hf(spec if not path.is_dir() else str(path), max_examples, seed)
    if max_examples is not None and max_examples < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in keep]
    return examples


def render_prompt(messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt text for MESSAGES (all but the response): the tokenizer's chat template with a generation
    prompt if it has one, else the plain template (`PLAIN_HEADERS`)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        if not isinstance(text, str):
            raise IlaError(f"tokenizer {tokenizer.name_or_path!r}: chat template rendered "
                           f"{type(text).__name__}, expected a string")
        return text
    parts = []
    for msg in messages:
        header = PLAIN_HEADERS.get(msg["role"], f"### {msg['role'].capitalize()}:\n")
        parts.append(header + msg["content"] + PLAIN_SEPARATOR)
    return "".join(parts) + PLAIN_GENERATION_PROMPT


def prompt_ids(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a rendered PROMPT as training sees them: no special tokens added, except BOS before a
    plain-template prompt when the tokenizer adds BOS by default."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if getattr(tokenizer, "chat_template", None) or bos is None or ids[:1] == [bos]:
        return list(ids)  # chat templates write their own special tokens
    # Plain template: prepend BOS only when the tokenizer adds one by default (Llama, Gemma; not GPT-2).
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos, *ids] if with_special[:1] == [bos] else list(ids)


def format_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict | None:
    """Tokenise one example: `input_ids` = prompt ids + response ids + EOS, truncated to MAX_LENGTH from the
    right; `labels` = -100 on the prompt, the ids on the response. None when no response token is left.

    Prompt and response are tokenised separately, so the prompt part is exactly the prompt's own tokens.
    A text example is its tokens (with the tokenizer's own special tokens) + EOS, every one of them a label.
    """
    if "text" in example:
        return _format_text(example["text"], tokenizer, max_length)
    messages = example["messages"]
    prompt_tokens = prompt_ids(render_prompt(messages[:-1], tokenizer), tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise IlaError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token, "
                       "expected one to end responses")
    response_ids = [*tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"], eos]
    if len(prompt_tokens) >= max_length:
        return None
    input_ids = (prompt_tokens + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_tokens) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _format_text(text: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict | None:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise IlaError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token, expected one to end texts")
    ids = [*tokenizer(text, add_special_tokens=True)["input_ids"], eos][:max_length]
    if len(ids) < 2:  # a causal LM learns from a token's successor: one token has none
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def build_dataset(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *,
                  max_length: int) -> Dataset:
    """Tokenise EXAMPLES (see `format_example`) into a Dataset with input_ids, attention_mask, labels.

    Examples whose prompt fills MAX_LENGTH are dropped (logged); IlaError if none is left.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise IlaError(f"max_length is {max_length!r}, expected an integer >= 2")
    if not examples:
        raise IlaError("no examples to tokenise, expected at least one")
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    dropped = 0
    for ex in examples:
        row = format_example(ex, tokenizer, max_length)
        if row is None:
            dropped += 1
            continue
        for key in columns:
            columns[key].append(row[key])
    if dropped:
        log.warning("dropped %d of %d examples whose prompt alone fills max_length=%d",
                    dropped, len(examples), max_length)
    if not columns["input_ids"]:
        raise IlaError(f"all {len(examples)} examples have a prompt of >= max_length={max_length} tokens, "
                       "expected room for the response; raise max_length")
    return Dataset.from_dict(columns)


def seeded_subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    """N rows of DATASET drawn with SEED (all of them, shuffled, when it has fewer): probe sets and example subsets."""
    return dataset.shuffle(seed=seed).select(range(min(n, len(dataset))))


def split_train_heldout(dataset: Dataset, *, heldout_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off round(len * HELDOUT_FRACTION) examples (at least 1 if the fraction is > 0), chosen with SEED.

    Both parts keep the dataset's order. HELDOUT_FRACTION must be in [0, 1); 0 gives an empty held-out set.
    """
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
            or not 0 <= heldout_fraction < 1:
        raise IlaError(f"heldout_fraction is {heldout_fraction!r}, expected a number in [0, 1)")
    n = len(dataset)
    n_held = 0 if heldout_fraction == 0 else max(1, round(n * heldout_fraction))
    if n_held >= n:
        raise IlaError(f"heldout_fraction={heldout_fraction} of {n} example(s) leaves none for training, "
                       "expected more examples or a smaller fraction")
    held = set(random.Random(seed).sample(range(n), n_held))
    train_idx = [i for i in range(n) if i not in held]
    return dataset.select(train_idx), dataset.select(sorted(held))


def collate(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict]:
    """A collator that pads input_ids with the pad id, attention_mask with 0 and labels with -100.

    If the tokenizer has no pad token, its EOS token becomes the pad token (padding is masked anyway).
    Padding goes on the right: without explicit position ids, left padding would shift the positions of
    models with absolute position embeddings (GPT-2).
    """
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise IlaError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token, "
                           "expected one to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  return_tensors="pt")


def load_data(spec: str | None, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 512,
              max_examples: int | None = None, heldout_fraction: float = 0.1,
              seed: int = 0) -> tuple[Dataset, Dataset]:
    """Load SPEC (default `DEFAULT_DATA`), tokenise it and split it: returns (train, heldout) Datasets."""
    examples = load_examples(spec, max_examples=max_examples, seed=seed)
    dataset = build_dataset(examples, tokenizer, max_length=max_length)
    return split_train_heldout(dataset, heldout_fraction=heldout_fraction, seed=seed)
