"""ist: Importance-aware Sparse Tuning on LoRA (seeds/002, IST), with the block scores written as a ranking.

Two loops over one importance score I_b per decoder block (I = 0 at the start; in `ila` a higher score means
more important):
- fine-tuning loop: each step only the LoRA weights of N_u = `update_fraction`·N_L blocks update, drawn without
  replacement with probability ∝ σ(I_b) (more important blocks more often); the others get no gradient, so AdamW
  leaves them as they are for that step;
- importance loop: every `interval` steps, `samples` trials each suppress the LoRA output of N_c =
  `suppress_fraction`·N_L blocks by β (drawn ∝ σ(−I_b): less important blocks more often) and take the loss
  L_j on one batch of `eval_examples` training examples (the same batch for every trial of the update). The
  reward of trial j is r_j = e^{−L_j} − mean_k e^{−L_k}; every suppressed block b of trial j gets
  I_b ← I_b − μ·r_j. A trial whose suppression left the loss low (r_j > 0) lowers the suppressed blocks' scores:
  they mattered little. (IST's public code stores the opposite sign, "high = unimportant".)

Suppression scales the LoRA branch through `ila.gates.LayerGates` (γ = β on the suppressed blocks' layers, 1
elsewhere), the mechanism ILA's stage 2 learns. Draws depend only on (seed, step), and every process uses the
same batch, so under data parallelism all processes keep the same scores. The scores and counts are saved into
each Trainer checkpoint folder before the Trainer writes it (so a checkpoint complete by its
`trainer_state.json` holds them) and read back on resume. At the end the scores are written as `DIR/ranking.json`
(block-level: every layer gets its block's score; `metadata.method = "ist"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ila.distributed import refuse_distributed
from ila.errors import IlaError
from ila.io import read_json, write_json_atomic
from ila.options import fraction, fraction_or_zero, option, positive
from ila.training.strategies.base import Context, Plan, Strategy, check_method, no_rankings, register

STATE_FILE = "ist_state.json"  # beside each Trainer checkpoint


@dataclass
class IstOptions:
    """IST's two loops (defaults: the public recipe)."""

    update_fraction: float = option(0.25, "N_u as a fraction of the blocks: blocks whose LoRA weights update each "
                                    "step", check=fraction, flag="--ist-update-fraction")
    suppress_fraction: float = option(0.5, "N_c as a fraction of the blocks: blocks suppressed in each trial",
                                      check=fraction, flag="--ist-suppress-fraction")
    beta: float = option(0.25, "β: factor on a suppressed block's LoRA output", check=fraction_or_zero)
    samples: int = option(3, "trials per importance update", check=positive, flag="--ist-samples")
    mu: float = option(10.0, "μ: step size of the score update", check=positive)
    interval: int = option(10, "steps between two importance updates", check=positive, flag="--ist-interval")
    eval_examples: int = option(16, "training examples in the batch each importance update is measured on",
                                check=positive)


def check(config: Any, options: IstOptions) -> None:
    check_method(config, STRATEGY)
    refuse_distributed("strategy ist", "it changes which blocks update every step, and FSDP and DeepSpeed keep "
                       "parameters or optimizer state in flat shards that cannot be frozen or freed block by "
                       "block", engines=True)
    no_rankings(config, "ist")


def count(fraction_of: float, n: int) -> int:
    """⌈fraction·n⌉ blocks, at least 1."""
    return max(1, math.ceil(fraction_of * n - 1e-9))


def draw(weights, k: int, seed: int, step: int, salt: int) -> list[int]:
    """k distinct indices drawn with probability ∝ weights; depends only on (seed, step, salt)."""
    import torch

    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + salt)
    return sorted(torch.multinomial(weights, k, replacement=False, generator=generator).tolist())


def update_scores(scores, trials: list[tuple[list[int], float]], mu: float) -> None:
    """IST's score update (see the module docstring), in place: `trials` holds (suppressed blocks, loss)."""
    rewards = [math.exp(-loss) for _, loss in trials]
    mean = sum(rewards) / len(rewards)
    for (blocks, _), reward in zip(trials, rewards, strict=True):
        for b in blocks:
            scores[b] -= mu * (reward - mean)


def prepare(context: Context) -> Plan:
    import torch
    from transformers import TrainerCallback

    from ila.gates import LayerGates
    from ila.layers import base_model_of
    from ila.selection import Selection
    from ila.training.loss import response_loss
    from ila.training.methods import apply_method

    config, options = context.config, context.options
    layers = context.layers
    model = apply_method(context.model, [x.name for x in layers], config)
    blocks = sorted({x.block for x in layers})
    n = len(blocks)
    n_update, n_suppress = count(options.update_fraction, n), count(options.suppress_fraction, n)
    gates = LayerGates(layers)
    lora_params: dict[int, list] = {b: [] for b in blocks}
    for name, p in base_model_of(model).named_parameters():
        if p.requires_grad:
            block = next((x.block for x in layers if name.startswith(f"{x.name}.")), None)
            if block is None:
                raise AssertionError(f"trainable parameter {name} belongs to no adapted layer")
            lora_params[block].append(p)
    scores = torch.zeros(n, dtype=torch.float64)
    updated = [0] * n
    rounds: list[dict] = []

    def round_loss(batch: dict, suppressed: list[int]) -> float:
        values = torch.tensor([options.beta if blocks.index(x.block) in suppressed else 1.0 for x in layers])
        with torch.no_grad(), gates.fixed(values):
            return float(response_loss(model, batch))

    class IstCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step > 0:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
                if not path.is_file():
                    raise IlaError(f"ist: {path} is missing; the checkpoint was not made by an IST run")
                saved = read_json(path, f"ist {path}")
                scores[:] = torch.tensor(saved["scores"], dtype=torch.float64)
                updated[:] = saved["updated"]
                rounds[:] = saved["rounds"]

        def on_step_begin(self, args, state, control, **kwargs):
            step = state.global_step
            if step > 0 and step % options.interval == 0:
                self.importance_round(step, args.device)
            chosen = draw(torch.sigmoid(scores), n_update, config.seed, step, 0)
            for i, b in enumerate(blocks):
                on = i in chosen
                updated[i] += on
                for p in lora_params[b]:
                    if not on:
                        p.grad = None
                    p.requires_grad_(on)

        def importance_round(self, step: int, device) -> None:
            generator = torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 1_009 + 1_008)
            rows = torch.randperm(len(context.train), generator=generator)[: options.eval_examples].tolist()
            batch = {k: v.to(device) for k, v in context.collator([context.train[i] for i in rows]).items()}
            was_training = model.training
            model.eval()
            gates.attach_lora(model)
            try:
                trials = []
                for j in range(options.samples):
                    suppressed = draw(torch.sigmoid(-scores), n_suppress, config.seed, step, j + 1)
                    trials.append((suppressed, round_loss(batch, suppressed)))
            finally:
                gates.detach()
                model.train(was_training)
            update_scores(scores, trials, options.mu)
            rounds.append({"step": step, "losses": [loss for _, loss in trials]})

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save and state.is_world_process_zero:  # before the Trainer writes the checkpoint
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
                write_json_atomic(path, {"scores": scores.tolist(), "updated": updated, "rounds": rounds})

    def record() -> dict:
        return {"blocks": n, "update_blocks": n_update, "suppress_blocks": n_suppress,
                "scores": scores.tolist(), "updated_steps": list(updated), "rounds": len(rounds)}

    def finish(out: Path, meta: dict) -> None:
        from ila.ranking import Ranking

        per_layer = [float(scores[blocks.index(x.block)]) for x in layers]
        ranking = Ranking.from_scores(layers, per_layer, {
            **meta, "method": "ist", "level": "block", "method_config": vars(options).copy(),
            "ist_rounds": len(rounds), "updated_steps": list(updated),
        })
        ranking.save(out / "ranking.json")

    selection = Selection("ist", list(layers), len(layers))
    return Plan(model, selection, [IstCallback()], sparse_steps=True, record=record, finish=finish)


STRATEGY = register(Strategy(
    name="ist", summary="LoRA on every block, N_u blocks updated per step by learned importance (IST, seeds/002)",
    prepare=prepare, methods=("lora",), options=IstOptions, check=check, needs_data=True,
))
