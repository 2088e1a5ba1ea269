"""Multi-process runs on CPU (gloo): `torchrun -m ila` and `accelerate launch -m ila` with the shipped config.

Equivalence: 2 processes × batch b take the same examples per optimizer step as 1 process × batch 2b (accelerate
shards each step's batches), and the loss is normalised by the response tokens of all processes, so with no
dropout the two runs differ only in floating-point summation order. Tolerance: ILA scores within 1e-4 (absolute,
scores are O(1)), losses within 1e-5 relative; measured differences are ~1e-6.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ila

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # a bound, not a timing: a hung launch fails here instead of blocking CI

IDENTIFY = {"max_length": 32, "max_examples": 64, "lora": {"r": 4, "dropout": 0.0},
            "stage1": {"max_steps": 6, "min_steps": 6, "interval": 3, "probe_examples": 8, "warmup_ratio": 0.0},
            "ila": {"max_steps": 6, "interval": 3, "probe_examples": 8, "tolerance": 1e-9}}
TRAIN = {"max_length": 32, "max_examples": 64, "max_steps": 6, "lora": {"r": 4, "dropout": 0.0}}


def _config(path: Path, base: dict, batch: int) -> Path:
    data = json.loads(json.dumps(base))
    if "stage1" in data:
        data["stage1"]["batch_size"] = data["ila"]["batch_size"] = batch
    else:
        data["batch_size"] = batch
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def _launch(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def _torchrun(*args: str, **env: str) -> subprocess.CompletedProcess:
    return _launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "ila", *map(str, args)],
                   **env)


@pytest.fixture(scope="module")
def model(model_dirs) -> Path:
    return model_dirs("llama")


def test_two_processes_identify_like_one_with_twice_the_batch(model, data_file, tmp_path):
    """`torchrun --nproc_per_node 2 -m ila identify`: two processes take part (the ranking says so), only the
    main one writes, and ILA's stage-1 losses and learned scores match one process with batch 2b."""
    two = _torchrun("identify", "--model", model, "--data", data_file, "--out", tmp_path / "two",
                    "--config", _config(tmp_path / "b2.yaml", IDENTIFY, 2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # the main process reports, once
    ila.identify(tmp_path / "one", config=_config(tmp_path / "b4.yaml", IDENTIFY, 4), model=str(model),
                 data=str(data_file))
    a, b = (json.loads((tmp_path / run / "ranking.json").read_text()) for run in ("two", "one"))
    assert (a["metadata"]["processes"], b["metadata"]["processes"]) == (2, 1)
    assert [x["name"] for x in a["layers"]] == [x["name"] for x in b["layers"]]
    for x, y in zip(a["layers"], b["layers"]):
        assert x["score"] == pytest.approx(y["score"], abs=1e-4)
    assert max(abs(x["score"] - 4.0) for x in a["layers"]) > 0.1  # the scores did learn
    for key in ("stage1_final_loss", "stage2_losses"):
        assert a["metadata"][key] == pytest.approx(b["metadata"][key], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "heatmap.png", "ranking.json"]


def test_two_processes_train_like_one_with_twice_the_batch(model, data_file, tmp_path):
    """`torchrun -m ila train` (LoRA) ends at the held-out loss of one process with batch 2b; `torchrun -m ila
    analyze` of that run writes its folder once."""
    two = _torchrun("train", "--model", model, "--data", data_file, "--out", tmp_path / "two",
                    "--config", _config(tmp_path / "b2.yaml", TRAIN, 2))
    assert two.returncode == 0, two.stderr[-3000:]
    one = ila.train(tmp_path / "one", config=_config(tmp_path / "b4.yaml", TRAIN, 4), model=str(model),
                    data=str(data_file))
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["processes"] == 2 and run["steps"] == 6
    assert run["heldout_loss"] == pytest.approx(one.heldout_loss, rel=1e-5)
    analyzed = _torchrun("analyze", "--base", model, "--tuned", tmp_path / "two", "--data", data_file,
                         "--max-examples", 16, "--max-length", 32, "--segments", 2, "--out", tmp_path / "analysis")
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    assert analyzed.stdout.count("wrote ") == 1 and (tmp_path / "analysis" / "metrics.json").is_file()
    first = ila.train(tmp_path / "b2-one", config=tmp_path / "b2.yaml", model=str(model), data=str(data_file))
    assert abs(first.heldout_loss - one.heldout_loss) > 1e-4  # batch b alone ends elsewhere: the test can fail


def test_shipped_multi_cpu_accelerate_config_starts_two_processes(model, data_file, tmp_path):
    """`accelerate launch --config_file configs/accelerate/multi_cpu.yaml -m ila train` really runs 2 processes
    (accelerate's own MULTI_CPU type or --cpu would start one)."""
    result = _launch([str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/multi_cpu.yaml",
                      "-m", "ila", "train", "--model", str(model), "--data", str(data_file),
                      "--out", str(tmp_path / "run"), "--config", str(_config(tmp_path / "c.yaml", TRAIN, 2))])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["processes"] == 2


@pytest.mark.parametrize(("args", "env", "message"), [
    (["eval", "--data", "{data}"], {}, "eval: cannot run in a 2-process launch (lm-eval"),
    (["train", "--method", "full", "--strategy", "lisa", "--data", "{data}", "--out", "{out}"],
     {"ACCELERATE_USE_FSDP": "true"}, "strategy lisa: cannot run under FSDP"),
    (["train", "--strategy", "ist", "--data", "{data}", "--out", "{out}"],
     {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     "strategy ist: cannot run under DeepSpeed ZeRO-3"),
    (["identify", "--data", "{data}", "--out", "{out}"], {"ACCELERATE_USE_FSDP": "true"},
     "method ila: cannot run under FSDP"),
])
def test_what_cannot_run_distributed_stops_every_process(model, data_file, tmp_path, args, env, message):
    """One line on each process, exit 2 on each, nothing written, no hang."""
    args = [a.format(data=data_file, out=tmp_path / "out") for a in args]
    result = _torchrun(*args, "--model", model, **env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("ila: error:")]
    assert len(errors) == 2 and all(message in line for line in errors), result.stderr[-2000:]
    assert result.stderr.count("ila: error:") == 2
    assert result.stderr.count("exitcode  : 2") + result.stderr.count("exitcode: 2") >= 1
    assert not re.search(r'File ".*[/\\]ila[/\\]', result.stderr)  # no traceback from ila (torchrun prints its own)
    assert not (tmp_path / "out").exists()


def test_every_importance_method_runs_with_two_processes(model, data_file, tmp_path):
    """`--method all` with a full-fine-tuning stage 1 under `torchrun`: every method (those that train, take
    gradients or only read) finishes without unused-parameter errors or hangs, and the comparison is written."""
    result = _torchrun("identify", "--method", "all", "--update", "full", "--model", model, "--data", data_file,
                       "--out", tmp_path / "all", "--config", _config(tmp_path / "c.yaml", IDENTIFY, 2),
                       "--shapley-budget", 12, "--shapley-examples", 4, "--block-influence-examples", 4,
                       "--grad-norm-batches", 1, "--ila-fast-examples", 4)
    assert result.returncode == 0, result.stderr[-3000:]
    methods = [p.parent.name for p in (tmp_path / "all").glob("*/ranking.json")]
    assert len(methods) >= 8 and (tmp_path / "all" / "comparison.json").is_file()
    for name in methods:
        assert json.loads((tmp_path / "all" / name / "ranking.json").read_text())["metadata"]["processes"] == 2
    assert (tmp_path / "all" / "delta.safetensors").is_file()


def test_whole_weights_of_fsdp2_sharded_parameters(tmp_path):
    """θ₀ copies, ΔW (full and LoRA), the saved delta and the saved adapter read FSDP2 shards whole
    (`ila.distributed.whole`), on every process."""
    script = Path(__file__).parent / "fsdp2_weights.py"
    result = _launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
                     PYTHONPATH=str(Path(__file__).parent))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert all(report.values()) and len(report) == 6, (rank, report)


def test_other_processes_write_nothing(model, data_file, tmp_path, monkeypatch):
    """A process that is not the main one (RANK=1) runs identify, train and analyze and writes no file; the same
    jobs as the main process write their folders."""
    settings = {"max_length": 32, "max_examples": 32}
    monkeypatch.setenv("RANK", "1")
    ila.identify(tmp_path / "snr", model=str(model), method="snr")
    ila.identify(tmp_path / "ila", model=str(model), data=str(data_file), max_steps=2, stage2_steps=2, **settings)
    ila.train(tmp_path / "train", model=str(model), data=str(data_file), max_steps=2, **settings)
    assert ila.analyze(tmp_path / "an", base=str(model), tuned=str(model), data=str(data_file), segments=2,
                       **settings) == []
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    assert written == []  # (the Trainer's own checkpoints follow its process index, which RANK alone does not set)
    monkeypatch.setenv("RANK", "0")
    ila.identify(tmp_path / "snr0", model=str(model), method="snr")
    assert (tmp_path / "snr0" / "ranking.json").is_file()


def test_engine_and_zero_stage_from_accelerate_variables(tmp_path, monkeypatch):
    """The engine comes from what accelerate's launcher passes each process; a ZeRO stage given only in a DeepSpeed
    JSON file is read from it, and one that cannot be read counts as sharded."""
    from ila import distributed

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert (distributed.engine(), distributed.zero_stage(), distributed.shards_parameters()) == ("deepspeed", 2, False)
    config.write_text("{}")
    assert distributed.zero_stage() == 3 and distributed.shards_parameters()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    assert distributed.zero_stage() == 1
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.engine() == "fsdp" and distributed.shards_parameters()
