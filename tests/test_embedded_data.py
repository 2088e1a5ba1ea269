"""The data sets shipped inside ila (`ila.data.embedded`, `src/ila/data/sets/`), read from the real files."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ila.cli import main
from ila.data import embedded, load_data, load_examples
from ila.errors import IlaError

ROOT = Path(__file__).resolve().parent.parent
ORIGINALS = ROOT.parent / "shared" / "data"  # the developers' and CI's copy of the original files
SFT = ("gsm8k", "roleplay", "codegen", "harmless")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _content(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def test_shipped_files_match_the_manifest() -> None:
    """Every shipped file decompresses to the bytes the manifest's sha256 names, with its row count; small."""
    total = 0
    for name, entry in embedded.manifest().items():
        assert (embedded.sets_dir() / name / "LICENSE").stat().st_size > 500
        for file, info in entry["files"].items():
            path = embedded.sets_dir() / name / file
            total += path.stat().st_size
            assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == info["sha256"], path
        for origin in entry["origin"]:
            assert len(origin["sha256"]) == 64 and origin["licence"] in ("MIT", "Apache-2.0")
    assert total <= 10 * 2**20
    for name in SFT:
        files = embedded.manifest()[name]["files"]
        assert [len(embedded.rows(name, s)) for s in ("train", "test")] == \
            [files["train.jsonl.gz"]["rows"], files["test.jsonl.gz"]["rows"]]
    assert sum(len(v) for v in embedded.bbh_tasks().values()) == 6511 and len(embedded.bbh_tasks()) == 27
    assert len(embedded.truthfulqa_rows()) == 817


@pytest.mark.skipif(not ORIGINALS.is_dir(), reason="the original files (../shared/data) are not on this machine")
def test_rebuild_matches_the_shipped_sets(tmp_path: Path) -> None:
    """tools/build_sets.py, run on the original files, writes exactly what ships."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_sets.py"), "--src", str(ORIGINALS),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shipped = sorted(p.relative_to(embedded.sets_dir()) for p in embedded.sets_dir().rglob("*") if p.is_file())
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert shipped == built and len(shipped) > 30
    for rel in shipped:
        a, b = (embedded.sets_dir() / rel).read_bytes(), (tmp_path / rel).read_bytes()
        if rel.suffix == ".gz":
            a, b = gzip.decompress(a), gzip.decompress(b)
        assert a == b, rel


@pytest.mark.skipif(not ORIGINALS.is_dir(), reason="the original files (../shared/data) are not on this machine")
def test_rebuild_refuses_an_original_with_another_sha256(tmp_path: Path) -> None:
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(ORIGINALS), str(src)], check=True)
    (src / "gsm8k" / "test.jsonl.gz").write_bytes(gzip.compress(b'{"question": "x", "answer": "#### 1"}\n'))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_sets.py"), "--src", str(src), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "gsm8k/test.jsonl.gz: sha256" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["roleplay", "codegen", "harmless"])
def test_train_and_test_splits_are_disjoint_and_fixed(name: str) -> None:
    train, test = embedded.rows(name, "train"), embedded.rows(name, "test")
    assert not {_content(r) for r in train} & {_content(r) for r in test}
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.25
    assert embedded.rows(name, "test") == test  # read again: the same rows in the same order


def test_gsm8k_splits_are_disjoint_and_every_answer_parses() -> None:
    train, test = embedded.rows("gsm8k", "train"), embedded.rows("gsm8k", "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert embedded.gsm8k_final_answer(train[0]["answer"]) == "72"  # "... #### 72"
    for row in train + test:
        number = embedded.gsm8k_final_answer(row["answer"])
        float(number)  # every final answer is a number
        assert "," not in number
        assert embedded.last_number(row["answer"]) == number  # the number after #### is the answer's last
    with_commas = [r for r in train if "," in r["answer"].rsplit("####", 1)[1]]
    assert with_commas and all("," not in embedded.gsm8k_final_answer(r["answer"]) for r in with_commas)
    assert embedded.last_number("so she pays $1,250.00 in total.") == "1250"
    assert embedded.last_number("no digits here") is None


def test_a_dialogue_s_response_is_its_last_assistant_turn(caplog: pytest.LogCaptureFixture) -> None:
    rows = embedded.rows("harmless", "train")
    with caplog.at_level(logging.WARNING):
        examples = load_examples("harmless")
    skipped = sum(embedded.dialogue_messages(r["chosen"]) is None for r in rows)
    assert 0 < skipped < 50 and len(examples) == len(rows) - skipped
    assert f"skipped {skipped} of {len(rows)} malformed rows" in caplog.text
    parsed = [r for r in rows if embedded.dialogue_messages(r["chosen"]) is not None]
    for row, ex in zip(parsed, examples):
        last = row["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
        assert ex["messages"][-1] == {"role": "assistant", "content": last}
        assert ex["messages"][0]["role"] == "user"
        assert row["chosen"].startswith("\n\nHuman: " + ex["messages"][0]["content"])
        assert [m["role"] for m in ex["messages"]] == ["user", "assistant"] * (len(ex["messages"]) // 2)
    multi = [ex for ex in examples if len(ex["messages"]) > 2]
    assert len(multi) > 100  # multi-turn dialogues keep their earlier turns as the conversation


def test_every_sft_set_loads_by_name_without_the_network(no_network, tokenizer) -> None:
    for name in SFT:
        examples = load_examples(name, max_examples=50, seed=3)
        assert len(examples) == 50 and all(ex["messages"][-1]["content"].strip() for ex in examples)
        assert load_examples(name, max_examples=50, seed=3) == examples  # the seed fixes the sample
        assert load_examples(name, max_examples=50, seed=4) != examples
    assert load_examples("gsm8k")[0]["messages"] == [
        {"role": "user", "content": embedded.rows("gsm8k")[0]["question"]},
        {"role": "assistant", "content": embedded.rows("gsm8k")[0]["answer"]}]
    roleplay = embedded.rows("roleplay")
    with_input = next(r for r in roleplay if r["input"].strip())
    ex = next(e for e in load_examples("roleplay") if e["messages"][-1]["content"] == with_input["response"])
    assert ex["messages"][0]["content"] == with_input["instruction"] + "\n\n" + with_input["input"]
    train, held = load_data("roleplay", tokenizer, max_examples=40, max_length=512, seed=1)
    assert (len(train), len(held)) == (36, 4)
    embedded.bbh_tasks(), embedded.truthfulqa_rows(), embedded.describe()


def test_unknown_names_and_benchmarks_as_data(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(IlaError, match=r"data 'gsm8kk': not an embedded set \(gsm8k, roleplay, codegen, "
                                       r"harmless\) nor a local file, and a Hugging Face hub dataset needs the "
                                       r"network, which is unreachable"):
        load_examples("gsm8kk")
    with pytest.raises(IlaError, match=r"data 'openai/gsm8k': not an embedded set .* needs the network"):
        load_examples("openai/gsm8k")
    with pytest.raises(IlaError, match=r"data set 'bbh' is a benchmark, not fine-tuning data \(SFT sets: gsm8k"):
        load_examples("bbh")
    with pytest.raises(IlaError, match=r"split 'dev', expected one of train, test"):
        embedded.rows("gsm8k", "dev")
    with pytest.raises(IlaError, match=r"data set 'nope': unknown name \(embedded sets: gsm8k, roleplay"):
        embedded.embedded_set("nope")


def test_dialogue_files_skip_malformed_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Goodbye.",
            "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: No."}
    bad = [{"chosen": "\n\nHuman: Hi\n\nAssistant: "},  # empty response
           {"chosen": "\n\nAssistant: I start\n\nHuman: wrong order"},
           {"chosen": "no turns at all"}, {"chosen": 7}]
    path = tmp_path / "dialogues.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]))
    with caplog.at_level(logging.WARNING):
        examples = load_examples(str(path))
    assert examples == [{"messages": [{"role": "user", "content": "Hi there"},
                                      {"role": "assistant", "content": "Hello!"},
                                      {"role": "user", "content": "Bye"},
                                      {"role": "assistant", "content": "Goodbye."}]}]
    assert "skipped 4 of 5 malformed rows (first: " in caplog.text and "line 2" in caplog.text
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(IlaError, match=r"no usable examples \(all 4 rows are malformed \(.*line 1: field 'chosen'"):
        load_examples(str(only_bad))


def test_cli_lists_the_sets_and_refuses_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in (*SFT, "bbh", "truthfulqa"):
        assert f"\n{name} " in "\n" + out
    assert "train 7473, test 1319" in out and "Apache-2.0" in out and "Anthropic/hh-rlhf" in out
    for data, message in [("nosuch", "not an embedded set (gsm8k, roleplay, codegen, harmless)"),
                          ("bigbench:natural_instructions", "set ILA_BIGBENCH to the path of a bigbench-1.0.0"),
                          ("truthfulqa", "is a benchmark, not fine-tuning data")]:
        out_dir = tmp_path / data.replace(":", "_")
        assert main(["train", "--data", data, "--out", str(out_dir), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
        assert not out_dir.exists()
