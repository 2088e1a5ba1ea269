"""The data sets that ship inside ila: one reader per source, shared by training data and evaluation.

The files under `ila/data/sets/` are written by `tools/build_sets.py` from the original files (sha256-checked);
`manifest.json` there records their rows and origins, and docs/data.md has a card per set. Nothing here touches
the network. SFT sets (`--data NAME`): gsm8k, roleplay, codegen, harmless. Benchmarks (`ila eval`): the test
splits of gsm8k and harmless, BBH and TruthfulQA.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ila.errors import IlaError


@dataclass(frozen=True)
class EmbeddedSet:
    """One shipped set: its name, what it is for and where the same data lives on the Hugging Face hub."""

    name: str
    kind: str  # "sft": `--data NAME` takes its train split; "eval": a benchmark of `ila eval`
    licence: str
    purpose: str
    hub: str  # the hub name (or lm-eval task) of the same data, for users online


SETS: dict[str, EmbeddedSet] = {s.name: s for s in (
    EmbeddedSet("gsm8k", "sft", "MIT", "grade-school maths: question -> worked solution ending '#### <number>'; "
                "test split: exact match on the final number", "openai/gsm8k (config main)"),
    EmbeddedSet("roleplay", "sft", "MIT", "GPTeacher roleplay: instruction [+ input] -> in-character response",
                "none by its authors (GitHub teknium1/GPTeacher Roleplay/*.json loads as a local file)"),
    EmbeddedSet("codegen", "sft", "MIT", "GPTeacher codegen: programming instruction [+ input] -> code",
                "none by its authors (GitHub teknium1/GPTeacher Codegen/*.json loads as a local file)"),
    EmbeddedSet("harmless", "sft", "MIT", "hh-rlhf harmless-base 'chosen' dialogues: the last Assistant turn is the "
                "response; test split: chosen-vs-rejected preference accuracy",
                "Anthropic/hh-rlhf (data_dir harmless-base)"),
    EmbeddedSet("bbh", "eval", "MIT", "BIG-Bench-Hard, 27 tasks: multiple choice where the options are listed, "
                "exact match otherwise", "lukaemon/bbh; lm-eval 'bbh'"),
    EmbeddedSet("truthfulqa", "eval", "Apache-2.0", "TruthfulQA MC1: the best answer against each incorrect one",
                "truthful_qa; lm-eval 'truthfulqa_mc1'"),
)}

HUB_LOAD_ARGS: dict[str, dict[str, str]] = {
    "openai/gsm8k": {"name": "main"},
    "Anthropic/hh-rlhf": {"data_dir": "harmless-base"},
}
"""`datasets.load_dataset` arguments for the hub names of the shipped SFT sets (docs/data.md)."""

SPLITS = ("train", "test")


def sets_dir() -> Path:
    """The folder of the shipped files (`ila/data/sets/`)."""
    return Path(str(resources.files("ila.data") / "sets"))


@functools.lru_cache(maxsize=1)
def manifest() -> dict[str, Any]:
    """`sets/manifest.json`: per set, its files (rows, sha256 of the uncompressed bytes) and origins."""
    return json.loads((sets_dir() / "manifest.json").read_text(encoding="utf-8"))["sets"]


def embedded_set(name: str) -> EmbeddedSet:
    """The shipped set NAME; an IlaError listing the known names otherwise."""
    if name not in SETS:
        raise IlaError(f"data set {name!r}: unknown name (embedded sets: {', '.join(SETS)})")
    return SETS[name]


def read_text(rel: str) -> str:
    """The uncompressed text of `sets/REL` (a `.gz` file); a one-line error when it is missing or corrupt."""
    path = sets_dir() / rel
    try:
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise IlaError(f"{path}: embedded data file missing; reinstall ila") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise IlaError(f"{path}: embedded data file is corrupt ({e}); reinstall ila") from None


def _jsonl(rel: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_text(rel).splitlines() if line.strip()]


def _split(name: str, split: str) -> str:
    if split not in SPLITS:
        raise IlaError(f"data set {name!r}: split {split!r}, expected one of {', '.join(SPLITS)}")
    return split


# ----------------------------------------------------------------------------------------------------------
# One reader per source


def rows(name: str, split: str = "train") -> list[dict[str, Any]]:
    """The raw rows of an SFT set's SPLIT: gsm8k `{question, answer}`, roleplay/codegen `{instruction, input,
    response}`, harmless `{chosen, rejected}` (each a '\\n\\nHuman: … \\n\\nAssistant: …' dialogue)."""
    if embedded_set(name).kind != "sft":
        raise IlaError(f"data set {name!r} is a benchmark, not fine-tuning data "
                       f"(SFT sets: {', '.join(n for n, s in SETS.items() if s.kind == 'sft')})")
    return _jsonl(f"{name}/{_split(name, split)}.jsonl.gz")


_FINAL_NUMBER = re.compile(r"####\s*(.+?)\s*$", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def gsm8k_final_answer(answer: str) -> str:
    """The number after GSM8K's `####`, commas removed (`"... #### 1,200"` -> `"1200"`)."""
    match = _FINAL_NUMBER.search(answer)
    if match is None:
        raise IlaError(f"GSM8K answer {answer[-40:]!r} has no '#### <number>' line")
    return canonical_number(match.group(1))


def canonical_number(text: str) -> str:
    """A number written the same way every time: no commas, `$` or trailing `.0`; the text itself otherwise."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    return str(int(value)) if value.is_integer() else repr(value)


def last_number(text: str) -> str | None:
    """The last number written in TEXT (canonical form), or None: how a GSM8K answer is read off a generation."""
    found = _NUMBER.findall(text)
    return canonical_number(found[-1]) if found else None


_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def dialogue_messages(text: str) -> list[dict[str, str]] | None:
    """The messages of an hh-rlhf dialogue (`\\n\\nHuman: … \\n\\nAssistant: …`): user/assistant turns that
    alternate, start with the user and end with a non-empty assistant turn (the response); None otherwise."""
    if not isinstance(text, str):
        return None
    parts = _TURN.split(text)
    if len(parts) < 5 or parts[0].strip():
        return None
    messages = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
                for who, said in zip(parts[1::2], parts[2::2])]
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2) or not messages[-1]["content"]:
        return None
    return messages


def bbh_tasks() -> dict[str, list[dict[str, str]]]:
    """BBH: task name -> its examples `{input, target}` (27 tasks)."""
    files = manifest()["bbh"]["files"]
    return {f.removesuffix(".json.gz"): json.loads(read_text(f"bbh/{f}"))["examples"] for f in sorted(files)}


def truthfulqa_rows() -> list[dict[str, Any]]:
    """TruthfulQA's 817 questions: `question`, `best` (Best Answer), `correct` and `incorrect` answer lists
    (the CSV's '; '-separated columns), `category`."""
    out = []
    for row in csv.DictReader(io.StringIO(read_text("truthfulqa/TruthfulQA.csv.gz"))):
        out.append({"question": row["Question"], "best": row["Best Answer"], "category": row["Category"],
                    "correct": [a.strip() for a in row["Correct Answers"].split(";") if a.strip()],
                    "incorrect": [a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()]})
    return out


# ----------------------------------------------------------------------------------------------------------
# Listing


def describe() -> list[dict[str, Any]]:
    """One row per shipped set: name, kind, rows per file, licence, purpose, hub name."""
    table = []
    for name, s in SETS.items():
        files = manifest()[name]["files"]
        if name == "bbh":
            counts = {"tasks": len(files), "rows": sum(f["rows"] for f in files.values())}
        elif name == "truthfulqa":
            counts = {"rows": sum(f["rows"] for f in files.values())}
        else:
            counts = {split: files[f"{split}.jsonl.gz"]["rows"] for split in SPLITS}
        table.append({"name": name, "kind": s.kind, "rows": counts, "licence": s.licence, "purpose": s.purpose,
                      "hub": s.hub})
    return table
