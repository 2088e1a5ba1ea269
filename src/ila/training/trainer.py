"""`ResponseLossTrainer`: the HF Trainer with the response-only loss and an optional extra loss term."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback

from ila.errors import IlaError, first_line
from ila.training.loss import response_loss

log = logging.getLogger(__name__)


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar (with ETA) showing the latest loss, without printing every log dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "eval_loss") and isinstance(v, float)}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class ResponseLossTrainer(Trainer):
    """Trainer whose loss is `response_loss` (+ `extra_loss()` when given).

    Gradient accumulation: the task loss of each micro-batch is its summed token loss divided by the response
    tokens of the whole optimizer step (the Trainer's `num_items_in_batch`: every micro-batch of the step, every
    process), so accumulating k micro-batches of b examples gives the gradient of one batch of k·b. The Trainer
    must then not divide the loss again: `loss_is_scaled_for_ga` says so on the transformers versions that read
    it, `model_accepts_loss_kwargs` on the earlier 5.x ones (which also makes them count `num_items_in_batch`).
    `extra_loss()` is added once per optimizer step (1/k per micro-batch).

    `logging_dir`: where `report_to: tensorboard` writes its event files.
    `frozen_eval=True` keeps the model in eval mode during training steps (no dropout): used by stage 2,
    where only the gate scores learn and the network must behave as at inference.
    The task loss and the extra term are logged apart (`task_loss`, `penalty`; means over processes and steps).
    """

    def __init__(
        self, *args: Any, extra_loss: Callable[[], torch.Tensor] | None = None, frozen_eval: bool = False,
        logging_dir: str | Path | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if logging_dir is not None:  # TensorBoard event files in the run folder (default: output_dir/runs/<time>)
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                    callback.logging_dir = str(logging_dir)
        self.model_accepts_loss_kwargs = True
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(QuietProgressCallback)
        self.extra_loss = extra_loss
        self.frozen_eval = frozen_eval
        self._parts = {"task_loss": 0.0, "penalty": 0.0}
        self._parts_steps: set[int] = set()  # optimizer steps the parts sum over since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        if self.frozen_eval:
            model.eval()
        if self.args.n_gpu > 1:  # DataParallel splits the token count per replica; this loss sees the whole batch
            num_items_in_batch = None
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        k = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        self._parts_steps.add(self.state.global_step)
        if num_items_in_batch is None:  # no token count: a micro-batch mean, which the Trainer divides by k
            loss, task_share, extra_scale = response_loss(model, inputs), 1 / k, 1.0
        else:
            loss = response_loss(model, inputs, reduction="sum") / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            task_share, extra_scale = 1.0, 1 / k
        self._parts["task_loss"] += float(loss.detach()) * task_share
        if self.extra_loss is not None:
            extra = self.extra_loss()
            self._parts["penalty"] += float(extra.detach()) / k
            loss = loss + extra * extra_scale
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:  # noqa: D102
        if "loss" in logs and self._parts_steps:  # a training log: every process calls it at the same step
            parts = torch.tensor([self._parts["task_loss"], self._parts["penalty"]], device=self.args.device)
            task, penalty = (self.accelerator.gather(parts[None]).mean(0) / len(self._parts_steps)).tolist()
            logs["task_loss"] = task
            if self.extra_loss is not None:
                logs["penalty"] = penalty
            self._parts = {"task_loss": 0.0, "penalty": 0.0}
            self._parts_steps.clear()
        super().log(logs, *args, **kwargs)

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
    gradient_checkpointing: bool = False,
    find_unused_parameters: bool = False,
) -> TrainingArguments:
    """TrainingArguments shared by all jobs: AdamW β = (0.9, 0.99) (seeds/000 App. B); eval only if asked.

    `find_unused_parameters`: some trainable parameters get no gradient in a step (a strategy that trains
    different layers at different steps); DDP must then look for them instead of waiting for their gradients.
    Gradient checkpointing is non-reentrant, which lets gradients reach trained layers above frozen ones.
    """
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
            activation_checkpointing=gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
            ddp_find_unused_parameters=True if find_unused_parameters else None,
        )
    except (ValueError, ImportError) as exc:  # e.g. an unknown report_to integration
        raise IlaError(f"training arguments: {first_line(exc)[:300]}") from None


def resume_checkpoint(work_dir: Path, resume: bool) -> str | None:
    """The checkpoint a run continues from: with `resume`, the newest complete one in `work_dir`. None starts at
    step 0; when `resume` found no checkpoint, a warning says so."""
    checkpoint = last_complete_checkpoint(work_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s; training starts at step 0", work_dir)
    return checkpoint


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
