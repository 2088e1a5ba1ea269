"""`ResponseLossTrainer`: the HF Trainer with the response-only loss and an optional extra loss term."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from ila.errors import IlaError, first_line
from ila.training.loss import response_loss


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar (with ETA) showing the latest loss, without printing every log dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "eval_loss") and isinstance(v, float)}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class ResponseLossTrainer(Trainer):
    """Trainer whose loss is `response_loss` (+ `extra_loss()` when given).

    `frozen_eval=True` keeps the model in eval mode during training steps (no dropout): used by stage 2,
    where only the gate scores learn and the network must behave as at inference.
    """

    # compute_loss returns each micro-batch's mean; the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self, *args: Any, extra_loss: Callable[[], torch.Tensor] | None = None, frozen_eval: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(QuietProgressCallback)
        self.extra_loss = extra_loss
        self.frozen_eval = frozen_eval

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        if self.frozen_eval:
            model.eval()
        loss = response_loss(model, inputs)
        if self.extra_loss is not None:
            loss = loss + self.extra_loss()
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: D102
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = response_loss(model, inputs)
        return loss.detach(), None, None


def training_arguments(
    output_dir: str | Path,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    gradient_accumulation_steps: int = 1,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    scheduler: str = "cosine",
    save_steps: int | None = None,
    report_to: str = "none",
    bf16: bool = False,
    logging_steps: int = 1,
    eval_steps: int | None = None,
) -> TrainingArguments:
    """TrainingArguments shared by all jobs: AdamW β = (0.9, 0.99) (seeds/000 App. B); eval only if asked."""
    try:
        return TrainingArguments(
            output_dir=str(output_dir),
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            adam_beta1=0.9,
            adam_beta2=0.99,
            lr_scheduler_type=scheduler,
            warmup_steps=round(warmup_ratio * max_steps),
            logging_steps=logging_steps,
            save_strategy="steps" if save_steps else "no",
            save_steps=save_steps or 500,
            save_total_limit=2,
            report_to=report_to,
            seed=seed,
            data_seed=seed,
            bf16=bf16,
            use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=False,
            eval_strategy="steps" if eval_steps else "no",
            eval_steps=eval_steps,
            per_device_eval_batch_size=batch_size,
            prediction_loss_only=True,
            include_num_input_tokens_seen="non_padding",
        )
    except (ValueError, ImportError) as exc:  # e.g. an unknown report_to integration
        raise IlaError(f"training arguments: {first_line(exc)[:300]}") from None


def last_complete_checkpoint(work_dir: Path) -> str | None:
    """The newest `checkpoint-N` whose `trainer_state.json` was written and parses (the Trainer writes it last,
    not atomically)."""
    if not work_dir.is_dir():
        return None
    done = [p for p in work_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _complete(p)]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _complete(checkpoint: Path) -> bool:
    try:
        return isinstance(json.loads((checkpoint / "trainer_state.json").read_text()), dict)
    except (OSError, ValueError):
        return False
