"""A killed `ila identify` / `ila train` resumes from its last complete checkpoint with --resume."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ila.training.trainer import last_complete_checkpoint


def _kill_at_first_complete_checkpoint(args: list[str], out: Path) -> int:
    """Start `args`, SIGKILL it once a checkpoint is completely written, return that checkpoint's step.

    The checkpoints live until the run ends, so the wait cannot miss them however fast the machine is.
    """
    log = out.parent / f"{out.name}.stderr"
    with log.open("w") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 300
    while last_complete_checkpoint(out / "checkpoints") is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, f"the run ended (rc {proc.returncode}) unkilled: {log.read_text()[-2000:]}"
    newest = last_complete_checkpoint(out / "checkpoints")
    assert newest, "no checkpoint was written within 300 s"
    return int(newest.rsplit("-", 1)[1])


def _fake_half_written_checkpoint(checkpoints: Path, step: int) -> None:
    """What a kill during a save leaves: a newer checkpoint folder without its trainer_state.json."""
    newer = checkpoints / f"checkpoint-{step + 5}"
    if not newer.exists():
        shutil.copytree(checkpoints / f"checkpoint-{step}", newer)
    (newer / "trainer_state.json").unlink(missing_ok=True)


def test_last_complete_checkpoint_skips_half_written_ones(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, state in [(5, "{}"), (10, '{"global_step": 10}'), (15, None), (20, ""), (9, "{}")]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:  # 20: killed while the Trainer was writing trainer_state.json
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # by step number, not name order


def _interrupt_and_resume(args: list[str], out: Path, steps: int, marker: str) -> tuple[int, dict]:
    """Kill the run at its first complete checkpoint, leave a half-written newer one, resume with --resume.

    Returns the step the kill left it at and the finished run's `marker` JSON."""
    killed_at = _kill_at_first_complete_checkpoint(args, out)
    assert 0 < killed_at < steps
    assert not (out / marker).exists()
    _fake_half_written_checkpoint(out / "checkpoints", killed_at)

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return killed_at, json.loads((out / marker).read_text())


def test_killed_run_resumes_from_its_checkpoint(model_dirs, data_file, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_length: 32\nstage1: {save_steps: 5, min_steps: 1000, learning_rate: 0.01}\n"
                   "ila: {max_steps: 2}\n")
    args = [sys.executable, "-m", "ila.cli", "identify", "--model", str(model_dirs("llama")), "--data",
            str(data_file), "--out", str(out), "--config", str(cfg), "--max-steps", "400"]
    killed_at, ranking = _interrupt_and_resume(args, out, 400, "ranking.json")
    meta = ranking["metadata"]
    assert meta["stage1_steps"] == 400
    assert meta["stage1_cost"]["steps"] == 400 - killed_at  # only the remaining steps ran in the second process
    # the probe history spans the whole run: the checks before the kill were replayed from the checkpoint
    steps = [step for step, _ in meta["stage1_probe_losses"]]
    assert steps[0] == 10 and steps[-1] == 400 and steps == sorted(set(steps))


def test_killed_train_resumes_from_its_checkpoint(model_dirs, data_file, tmp_path):
    out = tmp_path / "train"
    cfg = tmp_path / "t.yaml"
    cfg.write_text("save_steps: 5\n")
    args = [sys.executable, "-m", "ila.cli", "train", "--model", str(model_dirs("llama")), "--data", str(data_file),
            "--out", str(out), "--max-steps", "150", "--max-length", "32", "--method", "full", "--config", str(cfg)]
    killed_at, run = _interrupt_and_resume(args, out, 150, "run.json")
    assert run["steps"] == 150
    assert run["cost"]["steps"] == 150 - killed_at  # only the remaining steps ran after the resume
