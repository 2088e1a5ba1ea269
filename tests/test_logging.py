"""`report_to: tensorboard` writes TensorBoard event files into the run folder (offline) for identify and train."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_text_rows_in_identify_and_train(model_dirs, tmp_path):
    """`{"text": ...}` rows (continued pre-training data) run through ILA and `ila train`: every token is learned,
    so the held-out loss is taken over every token of the held-out texts."""
    import json

    from conftest import WORDS

    rows = [{"text": " ".join(WORDS[(i + j) % 40] for j in range(10))} for i in range(40)]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(model_dirs("llama"))
    ranking = ila.identify(tmp_path / "identify", model=model, data=str(data), max_steps=3, stage2_steps=2,
                           max_length=32)
    assert ranking.metadata["train_examples"] + ranking.metadata["heldout_examples"] == 40
    run = ila.train(tmp_path / "train", model=model, data=str(data), max_steps=2, max_length=32)
    assert run.heldout_loss is not None and run.cost["tokens_per_s"] > 0
    from transformers import AutoTokenizer

    from ila.data import collate, load_data
    from ila.evaluation.heldout import heldout_loss

    tokenizer = AutoTokenizer.from_pretrained(model)
    _, heldout = load_data(str(data), tokenizer, max_length=32, heldout_fraction=0.05)  # what the run held out
    scored = heldout_loss(run.model, heldout, collate(tokenizer))
    assert scored["tokens"] == sum(len(row["input_ids"]) - 1 for row in heldout)  # every token after the first
    assert scored["loss"] == pytest.approx(run.heldout_loss, rel=1e-6)
