"""`ila eval` end to end on tiny saved models: a run's held-out loss is reproduced; MC through lm-eval, on a local
file and on an embedded benchmark without the network."""

import json
import socket

import pytest

from ila.cli import main

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def train_run(model_dirs, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--model", str(model_dirs("llama")), "--data", str(data_file), "--out", str(out),
                 "--max-steps", "3", "--max-length", "32", "--data-seed", "5"]) == 0  # split by 5, not seed 0
    return out


def test_eval_on_a_run_reproduces_its_heldout_loss(train_run, tmp_path, capsys):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"w{i} w{i + 1}", "choices": ["w1", "w2", "w3"], "answer": i % 3})
                          + "\n" for i in range(6)))
    out = tmp_path / "res.json"
    code = main(["eval", "--run", str(train_run), "--mc", str(mc), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads(out.read_text())
    recorded = json.loads((train_run / "run.json").read_text())["heldout_loss"]
    assert results["heldout"]["loss"] == pytest.approx(recorded, rel=1e-6)
    assert results["source"]["adapter"].endswith("adapter")
    (task,) = results["multiple_choice"].values()
    assert task["n"] == 6 and 0 <= task["accuracy"] <= 1
    assert "held-out loss" in printed and "accuracy" in printed


def test_eval_on_a_run_with_embedded_truthfulqa_needs_no_network(train_run, tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network use: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    out = tmp_path / "res.json"
    assert main(["eval", "--run", str(train_run), "--mc", "truthfulqa", "--limit", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    task = results["multiple_choice"]["truthfulqa"]
    assert task["n"] == 20 and 0 <= task["accuracy"] <= 1 and task["source"] == "embedded"
    assert results["settings"] == {"mc": ["truthfulqa"], "exact": [], "limit": 20, "seed": 0}
    assert "truthfulqa: accuracy" in printed and "(n=20)" in printed


@pytest.mark.parametrize("args, needle", [
    (["--run", "/nonexistent/run"], "no run.json or ranking.json"),
    (["--limit", "0", "--mc", "truthfulqa"], "--limit"),
    (["--mc", "hhh_alignment"], "'bigbench:hhh_alignment' with ILA_BIGBENCH"),
    (["--mc", "bbh:no_such_task"], "no BBH task 'no_such_task'"),
    (["--judge-endpoint", "http://127.0.0.1:9"], "--judge-model"),
])
def test_eval_bad_input(args, needle, model_dirs, capsys):
    code = main(["eval", "--model", str(model_dirs("llama")), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and needle in err[-1] and err[-1].startswith("ila: error: ")
