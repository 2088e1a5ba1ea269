"""`report_to: tensorboard` writes TensorBoard event files into the run folder (offline) for identify and train."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ila


def _scalars(folder: Path) -> dict[str, int]:
    """Tag -> number of scalar points in the event files under `folder`."""
    files = list(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {folder}"
    counts: dict[str, int] = {}
    for path in files:
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            counts[tag] = counts.get(tag, 0) + len(events.Scalars(tag))
    return counts


def test_tensorboard_logs_in_the_run_folder(model_dirs, data_file, tmp_path):
    model = str(model_dirs("llama"))
    ila.identify(tmp_path / "identify", model=model, data=str(data_file), max_steps=4, stage2_steps=3,
                 max_length=32, max_examples=32, report_to="tensorboard")
    stage1 = _scalars(tmp_path / "identify" / "logs" / "stage1")
    stage2 = _scalars(tmp_path / "identify" / "logs" / "stage2")
    assert stage1["train/loss"] == 4 and stage2["train/loss"] == 3 and stage2["train/penalty"] == 3
    ila.train(tmp_path / "train", model=model, data=str(data_file), max_steps=3, max_length=32, max_examples=32,
              report_to="tensorboard")
    assert _scalars(tmp_path / "train" / "logs")["train/loss"] == 3
    assert not list((tmp_path / "train").rglob("runs"))  # not the Trainer's default output_dir/runs/<time>
