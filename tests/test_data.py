"""ila.data on real files, real (tiny, locally trained) tokenizers and an archive laid out as BIG-bench's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from tokenizers import decoders as tk_decoders
from transformers import PreTrainedTokenizerFast

from ila.data import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    build_dataset,
    collate,
    format_example,
    load_data,
    load_examples,
    render_prompt,
    split_train_heldout,
)
from ila.errors import IlaError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Name a primary colour. Red is a primary colour.",
    "Translate to French: the cat sleeps. Le chat dort.",
    "What is two plus two? Two plus two is four.",
    "### Instruction: ### Response: ### System: Definition: Fact: Question: Answer:",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
]

ALPACA = [
    {"instruction": "Name a primary colour.", "output": "Red."},
    {"instruction": "Translate to French.", "input": "The cat sleeps.", "output": "Le chat dort."},
    {"instruction": "What is two plus two?", "input": "", "output": "Four.", "system": "Be brief."},
]
MESSAGES = [
    {"messages": [{"role": "user", "content": "Name a primary colour."},
                  {"role": "assistant", "content": "Red."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Four."}]},
]


def _train_tokenizer(*, chat: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if not chat:  # a Llama-like tokenizer that adds BOS by default
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if chat else None)
    if chat:
        fast.eos_token = "<|im_end|>"
        fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def plain_tok() -> PreTrainedTokenizerFast:
    return _train_tokenizer(chat=False)


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerFast:
    return _train_tokenizer(chat=True)


def _write(path: Path, rows: list, *, jsonl: bool) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows))
    return path


# ---------------------------------------------------------------------------------------------- loading files


@pytest.mark.parametrize("jsonl", [False, True])
def test_alpaca_file_loads(tmp_path: Path, jsonl: bool) -> None:
    path = _write(tmp_path / ("a.jsonl" if jsonl else "a.json"), ALPACA, jsonl=jsonl)
    ex = load_examples(str(path))
    assert ex[0] == {"messages": [{"role": "user", "content": "Name a primary colour."},
                                  {"role": "assistant", "content": "Red."}]}
    assert ex[1]["messages"][0]["content"] == "Translate to French.\n\nThe cat sleeps."
    assert ex[2]["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is two plus two?"},
                                 {"role": "assistant", "content": "Four."}]


@pytest.mark.parametrize("jsonl", [False, True])
def test_messages_file_loads(tmp_path: Path, jsonl: bool) -> None:
    path = _write(tmp_path / ("m.jsonl" if jsonl else "m.json"), MESSAGES, jsonl=jsonl)
    assert load_examples(str(path)) == MESSAGES


def test_conversations_and_empty_responses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"conversations": ["Hi?", "Hello."]}, {"instruction": "Say nothing.", "output": "  "}]
    with caplog.at_level(logging.WARNING, logger="ila.data"):
        ex = load_examples(str(_write(tmp_path / "c.jsonl", rows, jsonl=True)))
    assert ex == [{"messages": [{"role": "user", "content": "Hi?"},
                                {"role": "assistant", "content": "Hello."}]}]
    assert "dropped 1 of 2 rows" in caplog.text


def test_max_examples_is_seeded(tmp_path: Path) -> None:
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(50)]
    path = str(_write(tmp_path / "many.jsonl", rows, jsonl=True))
    a, b, c = (load_examples(path, max_examples=10, seed=s) for s in (1, 1, 2))
    assert len(a) == 10 and a == b and a != c


def test_directory_goes_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "ds"
    folder.mkdir()
    _write(folder / "train.jsonl", ALPACA, jsonl=True)
    ex = load_examples(str(folder))
    assert [e["messages"][-1]["content"] for e in ex] == ["Red.", "Le chat dort.", "Four."]


# ----------------------------------------------------------------------------------------- tokenisation


def _prompt_len(row: dict) -> int:
    return sum(1 for label in row["labels"] if label == IGNORE_INDEX)


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_labels_mask_exactly_the_prompt(which: str, plain_tok, chat_tok) -> None:
    tok = plain_tok if which == "plain" else chat_tok
    ex = MESSAGES[1]
    row = format_example(ex, tok, max_length=512)
    prompt_text = render_prompt(ex["messages"][:-1], tok)
    expected_prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    if which == "plain":
        assert prompt_text == ("### System:\nBe brief.\n\n### Instruction:\nWhat is two plus two?\n\n"
                               "### Response:\n")
        expected_prompt = [tok.bos_token_id, *expected_prompt]  # this tokenizer adds BOS by default
    else:
        assert prompt_text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                               "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    expected_response = [*tok("Four.", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert row["input_ids"] == expected_prompt + expected_response
    n = len(expected_prompt)
    assert _prompt_len(row) == n
    assert row["labels"][:n] == [IGNORE_INDEX] * n
    assert row["labels"][n:] == row["input_ids"][n:] == expected_response
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_plain_template_single_turn(plain_tok) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_prompt(msgs, plain_tok) == PLAIN_TEMPLATE.format(instruction="Hi")


def test_truncation_and_drop(plain_tok, caplog: pytest.LogCaptureFixture) -> None:
    long_answer = {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "the quick brown fox " * 20}]}
    long_prompt = {"messages": [{"role": "user", "content": "the lazy dog " * 40},
                                {"role": "assistant", "content": "Yes."}]}
    full = format_example(long_answer, plain_tok, max_length=10_000)
    n = _prompt_len(full)
    cut = format_example(long_answer, plain_tok, max_length=n + 3)
    assert cut["input_ids"] == full["input_ids"][: n + 3]
    assert cut["labels"] == [IGNORE_INDEX] * n + full["input_ids"][n : n + 3]
    assert format_example(long_answer, plain_tok, max_length=n) is None  # no response token left
    with caplog.at_level(logging.WARNING, logger="ila.data"):
        ds = build_dataset([long_answer, long_prompt, long_answer], plain_tok, max_length=n + 3)
    assert len(ds) == 2 and all(len(ids) == n + 3 for ids in ds["input_ids"])
    assert "dropped 1 of 3 examples" in caplog.text
    with pytest.raises(IlaError, match="max_length=5"):
        build_dataset([long_prompt], plain_tok, max_length=5)


def test_collate_pads(chat_tok) -> None:
    ds = build_dataset(MESSAGES, chat_tok, max_length=512)
    batch = collate(chat_tok)([ds[0], ds[1]])
    short = len(ds[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(ds[1]["input_ids"]))
    assert batch["input_ids"][0, short:].eq(chat_tok.pad_token_id).all()
    assert batch["attention_mask"][0, short:].eq(0).all() and batch["attention_mask"][0, :short].eq(1).all()
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()
    assert batch["labels"][0, :short].tolist() == ds[0]["labels"]


def test_split_and_load_data(tmp_path: Path, chat_tok) -> None:
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(40)]
    path = str(_write(tmp_path / "q.json", rows, jsonl=False))
    ds = build_dataset(load_examples(path), chat_tok, max_length=64)
    a_train, a_held = split_train_heldout(ds, heldout_fraction=0.25, seed=3)
    b_train, b_held = split_train_heldout(ds, heldout_fraction=0.25, seed=3)
    _, c_held = split_train_heldout(ds, heldout_fraction=0.25, seed=4)
    assert len(a_train) == 30 and len(a_held) == 10
    assert a_held["input_ids"] == b_held["input_ids"] and a_train["input_ids"] == b_train["input_ids"]
    assert a_held["input_ids"] != c_held["input_ids"]
    assert not {tuple(x) for x in a_held["input_ids"]} & {tuple(x) for x in a_train["input_ids"]}
    train, held = split_train_heldout(ds, heldout_fraction=0.0, seed=0)
    assert len(train) == 40 and len(held) == 0
    train, held = load_data(path, chat_tok, max_length=64, max_examples=20, heldout_fraction=0.1, seed=0)
    assert (len(train), len(held)) == (18, 2) and set(train.column_names) == {"input_ids", "attention_mask",
                                                                           "labels"}


# ----------------------------------------------------------------------------------------------- errors


def _error_cases(tmp_path: Path) -> list[tuple[str, str]]:
    """(spec, regex the one-line IlaError must match) for bad local files."""
    def w(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    good = json.dumps(ALPACA[0])
    return [
        (str(tmp_path / "missing.jsonl"), r"missing\.jsonl: data file not found"),
        (w("bad.jsonl", f"{good}\n{{oops\n"), r"bad\.jsonl: line 2: invalid JSON"),
        (w("bad.json", "[{"), r"bad\.json: invalid JSON .*line 1"),
        (w("dict.json", "{}"), r"dict\.json: top level is a JSON dict, expected a list"),
        (w("empty.jsonl", "\n\n"), r"empty\.jsonl: file is empty"),
        (w("none.json", "[]"), r"none\.json: no usable examples \(no rows\)"),
        (w("blank.json", json.dumps([{"instruction": "x", "output": ""}])),
         r"blank\.json: no usable examples"),
        (w("noout.json", json.dumps([ALPACA[0], {"instruction": "x"}])),
         r"noout\.json: row 1: missing field 'output'"),
        (w("nofields.jsonl", f"{good}\n{json.dumps({'prompt': 'x'})}\n"),
         r"nofields\.jsonl: line 2: missing field 'instruction'.*fields present: prompt"),
        (w("type.json", json.dumps([{"instruction": "x", "output": 3}])),
         r"type\.json: row 0: field 'output' is int 3, expected a string"),
        (w("notobj.json", json.dumps(["x"])), r"notobj\.json: row 0: expected a JSON object, got str"),
        (w("role.json", json.dumps([{"messages": [{"role": "user", "content": "a"},
                                                  {"role": "user", "content": "b"}]}])),
         r"role\.json: row 0: field 'messages'\[1\]\.role is 'user', expected 'assistant'"),
        (w("content.json", json.dumps([{"messages": [{"role": "user", "content": 1},
                                                     {"role": "assistant", "content": "b"}]}])),
         r"content\.json: row 0: field 'messages'\[0\]\.content is int 1, expected a string"),
        (w("short.json", json.dumps([{"messages": [{"role": "assistant", "content": "b"}]}])),
         r"short\.json: row 0: field 'messages' has 1 message\(s\), expected at least 2"),
        (w("data.csv", "instruction,output\n"), r"data\.csv: unsupported file type '\.csv'"),
    ]


def test_file_errors_are_one_line(tmp_path: Path) -> None:
    for spec, pattern in _error_cases(tmp_path):
        with pytest.raises(IlaError, match=pattern) as info:
            load_examples(spec)
        assert "\n" not in str(info.value), spec


def test_argument_errors(tmp_path: Path, chat_tok) -> None:
    ds = build_dataset(MESSAGES, chat_tok, max_length=64)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(IlaError, match=rf"heldout_fraction is {bad}, expected a number in \[0, 1\)"):
            split_train_heldout(ds, heldout_fraction=bad, seed=0)
    with pytest.raises(IlaError, match="leaves none for training"):
        split_train_heldout(ds.select([0]), heldout_fraction=0.5, seed=0)
    with pytest.raises(IlaError, match="max_examples is 0, expected a positive integer"):
        load_examples(str(_write(tmp_path / "a.json", ALPACA, jsonl=False)), max_examples=0)
    with pytest.raises(IlaError, match="max_length is 1"):
        build_dataset(MESSAGES, chat_tok, max_length=1)


def test_unreachable_dataset_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # Offline mode: fail at once instead of retrying an unreachable hub for ~25 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(IlaError, match=r"data 'no-such-user/no-such-data': not an embedded set \(gsm8k, .*\) nor "
                                       r"a local file, and a Hugging Face hub dataset needs the network"):
        load_examples("no-such-user/no-such-data")


# --------------------------------------------------------------------------------------------- BIG-bench

def _task(description: str, n: int, tag: str) -> dict:
    return {"description": description, "examples": [{"input": f"{tag} question {i}?", "target": f"{tag} {i}"}
                                                     for i in range(n)]}


@pytest.fixture
def bigbench_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small archive laid out as the BIG-bench 1.0.0 sdist, named by ILA_BIGBENCH; a fresh ILA_CACHE."""
    import io
    import tarfile

    members = {
        "natural_instructions/subtask045_miscellaneous_sentence_paraphrasing/task.json":
            _task("Definition: paraphrase the sentence.", 30, "p"),
        "natural_instructions/subtask047_misc_answering_science_questions/task.json":
            _task("Definition: answer the science question.", 12, "s"),
        "strategyqa/task.json": {"examples": [{"input": "Is it?", "target": ["Yes", "Yes."]},
                                              {"input": "No target"}]},
        "bbq_lite/bbq_lite.py": "print('programmatic task')",
    }
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for rel, content in members.items():
            data = (content if isinstance(content, str) else json.dumps(content)).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("ILA_BIGBENCH", str(archive))
    monkeypatch.setenv("ILA_CACHE", str(tmp_path / "cache"))
    return archive


def test_bigbench_specs_read_the_archive_the_user_names(bigbench_archive: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    cold = load_examples("bigbench:natural_instructions/subtask045")  # builds the index, extracts subtask045
    cache = tmp_path / "cache" / "bigbench" / "bigbench-1.0.0"
    assert (cache / "index.json").is_file() and len(cold) == 30
    assert cold[0]["messages"] == [{"role": "user", "content": "Definition: paraphrase the sentence.\n\np question 0?"},
                                   {"role": "assistant", "content": "p 0"}]
    # Two subtasks (045 by prefix, 047 by glob), capped, spread evenly over them.
    ex = load_examples("bigbench:natural_instructions/subtask045,subtask047_*", max_examples=20, seed=0)
    prompts = [e["messages"][0]["content"] for e in ex]
    assert len(ex) == 20 and sum(p.startswith("Definition: answer") for p in prompts) == 10
    assert load_examples("bigbench:natural_instructions/subtask045,subtask047_*", max_examples=20, seed=0) == ex
    with caplog.at_level(logging.WARNING):
        strategy = load_examples("bigbench:strategyqa")
    assert strategy == [{"messages": [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "Yes"}]}]
    assert "skipped 1 of 2 examples" in caplog.text


def test_bigbench_errors(bigbench_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        ("bigbench:natural_instruction", r"no BIG-bench task 'natural_instruction'.*natural_instructions"),
        ("bigbench:natural_instructions/subtask999*", r"no subtask of 'natural_instructions' matches "
                                                      r"'subtask999\*'; 2 subtasks, e\.g\. subtask"),
        ("bigbench:strategyqa/x", r"'strategyqa' has no subtasks"),
        ("bigbench:bbq_lite", r"'bbq_lite' is programmatic"),
        ("bigbench:", r"missing task name"),
    ]
    for spec, pattern in cases:
        with pytest.raises(IlaError, match=pattern) as info:
            load_examples(spec)
        assert "\n" not in str(info.value)
    monkeypatch.setenv("ILA_BIGBENCH", str(bigbench_archive.with_name("missing.tar.gz")))
    with pytest.raises(IlaError, match=r"ILA_BIGBENCH=.*missing.tar.gz: not a .tar.gz/.tar file"):
        load_examples("bigbench:strategyqa")
    monkeypatch.delenv("ILA_BIGBENCH")
    with pytest.raises(IlaError, match=r"'bigbench:' specs read a BIG-bench source archive that ila does not "
                                       r"ship: set ILA_BIGBENCH"):
        load_examples("bigbench:strategyqa")


# ------------------------------------------------------------------------------------------------- text rows


def test_text_rows_learn_every_token(tmp_path: Path, plain_tok, chat_tok) -> None:
    """`{"text": ...}` rows (mixed with alpaca rows in one file) are their tokens + EOS, every one a label: no
    chat template and no prompt mask, with the tokenizer's own BOS where it adds one."""
    text = "The quick brown fox jumps over the lazy dog."
    path = _write(tmp_path / "mixed.jsonl", [{"text": text}, ALPACA[0], {"text": "  "}], jsonl=True)
    examples = load_examples(str(path))
    assert examples[0] == {"text": text} and "messages" in examples[1] and len(examples) == 2  # blank dropped
    for tok, bos in ((plain_tok, [plain_tok.bos_token_id]), (chat_tok, [])):
        row = format_example(examples[0], tok, max_length=512)
        expected = [*bos, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        assert row["input_ids"] == row["labels"] == expected
        assert IGNORE_INDEX not in row["labels"]
        assert format_example(examples[0], tok, max_length=5)["input_ids"] == expected[:5]
    ds = build_dataset(examples, chat_tok, max_length=64)
    assert len(ds) == 2 and IGNORE_INDEX in ds[1]["labels"]  # the alpaca row keeps its prompt mask


def test_text_row_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", [{"text": 3}], jsonl=True)
    with pytest.raises(IlaError, match=r"line 1: field 'text' is int 3, expected a string"):
        load_examples(str(path))
    from ila.evaluation.exact_match import exact_match_items

    good = _write(tmp_path / "text.jsonl", [{"text": "some words"}], jsonl=True)
    with pytest.raises(IlaError, match="text rows have no prompt and target"):
        exact_match_items(str(good), limit=None)
