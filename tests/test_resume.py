"""A killed `ila identify` resumes stage 1 from its last checkpoint with --resume."""

import json
import subprocess
import sys
import time

from ila.training.trainer import last_complete_checkpoint


def test_killed_run_resumes_from_its_checkpoint(model_dirs, data_file, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_length: 32\nstage1: {save_steps: 5, min_steps: 1000, learning_rate: 0.01}\n"
                   "stage2: {steps: 2}\n")
    args = [sys.executable, "-m", "ila.cli", "identify", "--model", str(model_dirs("llama")), "--data",
            str(data_file), "--out", str(out), "--config", str(cfg), "--max-steps", "400"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("checkpoints/checkpoint-1[05]")) and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    # the kill may leave the newest checkpoint half-written; resume must use the newest complete one
    done = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoints/checkpoint-*/trainer_state.json"))
    assert done and done[-1] < 400, "the run should have been killed mid-way"
    assert last_complete_checkpoint(out / "checkpoints").endswith(f"checkpoint-{done[-1]}")
    assert not (out / "ranking.json").exists()

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    meta = json.loads((out / "ranking.json").read_text())["metadata"]
    assert meta["stage1_steps"] == 400
    assert meta["stage1_cost"]["steps"] == 400 - done[-1]  # only the remaining steps ran in the second process
    # the probe history spans the whole run: the checks before the kill were replayed from the checkpoint
    steps = [step for step, _ in meta["stage1_probe_losses"]]
    assert steps[0] == 10 and steps[-1] == 400 and steps == sorted(set(steps))


def test_killed_train_resumes_from_its_checkpoint(model_dirs, data_file, tmp_path):
    out = tmp_path / "train"
    args = [sys.executable, "-m", "ila.cli", "train", "--model", str(model_dirs("llama")), "--data", str(data_file),
            "--out", str(out), "--max-steps", "150", "--max-length", "32", "--method", "full"]
    cfg = tmp_path / "t.yaml"
    cfg.write_text("save_steps: 5\n")
    proc = subprocess.Popen([*args, "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("checkpoints/checkpoint-*/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert not (out / "run.json").exists()
    resume_from = int(last_complete_checkpoint(out / "checkpoints").rsplit("-", 1)[1])
    assert 0 < resume_from < 150

    resumed = subprocess.run([*args, "--config", str(cfg), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 150
    assert run["cost"]["steps"] == 150 - resume_from  # only the remaining steps ran after the resume
