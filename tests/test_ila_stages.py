"""Stage 1 trains until ε-stable or the cap; stage 2 learns scores that separate helpful from harmful updates."""

from pathlib import Path

import pytest
import torch
from conftest import make_model

from ila.config import IdentifyConfig
from ila.data import collate, load_data
from ila.importance.ila import IlaOptions
from ila.importance.stage1 import run_stage1
from ila.importance.stage2 import run_stage2
from ila.layers import discover_layers
from ila.ranking import Ranking


def small_config(**stage1) -> IdentifyConfig:
    c = IdentifyConfig()
    c.lora.r, c.lora.alpha, c.lora.dropout = 4, 16, 0.0
    c.stage1.max_steps, c.stage1.learning_rate, c.stage1.batch_size = 40, 2e-2, 8
    c.stage1.min_steps, c.stage1.interval = 10, 5
    for k, v in stage1.items():
        setattr(c.stage1, k, v)
    return c


def stage2(model, layers, data, collator, work, *, seed=0, initial=None, **options):
    """Stage 2 with small settings on `data` (its first 16 examples are the probe set)."""
    o = IlaOptions(max_steps=30, batch_size=8, learning_rate=0.3, min_steps=30, probe_examples=16)
    for k, v in options.items():
        setattr(o, k, v)
    return run_stage2(model, layers, data, data.select(range(o.probe_examples)), collator, o, work, seed=seed,
                      initial=initial)


@pytest.fixture(scope="module")
def toy(data_file, tokenizer):
    train, heldout = load_data(str(data_file), tokenizer, max_length=32, heldout_fraction=0.2, seed=0)
    return train, heldout, collate(tokenizer)


def test_stage1_learns_and_records_stability(toy, tmp_path):
    train, heldout, collator = toy
    model = make_model("llama")
    layers = discover_layers(model)
    config = small_config(epsilon=5e-2)  # loose ε: the toy task plateaus quickly
    result = run_stage1(model, layers, train, collator, config, tmp_path, probe_dataset=heldout)
    probe = [loss for _, loss in result.probe_losses]
    assert probe[-1] < probe[0]  # it learned
    assert result.stability_step is not None and result.stability_step == result.steps < 40
    tight = run_stage1(make_model("llama"), layers, train, collator, small_config(epsilon=1e-9), tmp_path / "b",
                       probe_dataset=heldout)
    assert tight.stability_step is None and tight.steps == 40  # the cap applies


def test_stage2_ranks_harmful_updates_below_helpful_ones(toy, tmp_path):
    train, heldout, collator = toy
    model = make_model("llama")
    layers = discover_layers(model)
    config = small_config(epsilon=1e-9, max_steps=60)
    s1 = run_stage1(model, layers, train, collator, config, tmp_path / "s1")
    peft_model = s1.model
    # Turn three learned updates into harmful ones, ΔW -> -ΔW, on layers that write straight into the
    # residual stream (value, MLP); a negated q/k update only reshapes attention and may do little harm.
    harmful = {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name and any(f"{h}.lora_B" in name for h in harmful):
                p.neg_()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    s2 = stage2(peft_model, layers, train, collator, tmp_path / "s2")
    ranking = Ranking.from_scores(layers, s2.scores)
    bottom = {x.name for x in ranking.bottom(len(harmful) / len(layers))}
    assert bottom == harmful
    # the tie-break −∂L/∂γ: switching a harmful update further on raises the loss
    assert all(g > 0 for x, g in zip(layers, s2.gate_gradient) if x.name in harmful)
    # Stage 2 changes nothing but the scores.
    for name, p in peft_model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert s2.losses[-1] < s2.losses[0]


def test_full_finetuning_stage1_and_gated_stage2(toy, tmp_path):
    train, heldout, collator = toy
    model = make_model("qwen2")
    layers = discover_layers(model)
    config = small_config(update="full", learning_rate=1e-3, max_steps=15, epsilon=1e-9)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "layers" not in n or "norm" in n}
    s1 = run_stage1(model, layers, train, collator, config, tmp_path / "s1")
    assert s1.initial is not None and set(s1.initial) == {x.name for x in layers}
    for name, p in s1.model.named_parameters():  # only the gated linear layers moved
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    moved = [x for x in layers if not torch.equal(s1.model.get_submodule(x.name).weight, s1.initial[x.name]["weight"])]
    assert len(moved) == len(layers)
    s2 = stage2(s1.model, layers, train, collator, tmp_path / "s2", initial=s1.initial)
    assert len(s2.scores) == len(layers) and len(set(s2.scores)) > 1


def test_same_seed_same_ranking(toy, tmp_path: Path):
    train, _, collator = toy
    scores = []
    for run in range(2):
        model = make_model("gpt2")
        layers = discover_layers(model)
        config = small_config(epsilon=1e-9, max_steps=10)
        s1 = run_stage1(model, layers, train, collator, config, tmp_path / f"a{run}")
        scores.append(stage2(s1.model, layers, train, collator, tmp_path / f"b{run}", max_steps=8).scores)
    assert scores[0] == scores[1]


def test_without_a_probe_set_the_smoothed_training_loss_decides(toy, tmp_path):
    train, _, collator = toy
    model = make_model("llama")
    result = run_stage1(model, discover_layers(model), train, collator, small_config(epsilon=5e-2), tmp_path)
    steps = [step for step, _ in result.probe_losses]
    assert steps and all(step % 5 == 0 for step in steps)  # checked every `interval` steps
    assert result.stability_step is not None and result.stability_step < 40


def test_another_seed_another_ranking(toy, tmp_path):
    train, _, collator = toy
    scores = []
    for seed in (0, 1):
        model = make_model("gpt2")
        layers = discover_layers(model)
        config = small_config(epsilon=1e-9, max_steps=10)
        config.seed = seed
        s1 = run_stage1(model, layers, train, collator, config, tmp_path / f"a{seed}")
        scores.append(stage2(s1.model, layers, train, collator, tmp_path / f"b{seed}", max_steps=8,
                             seed=seed).scores)
    assert scores[0] != scores[1]


def test_settle_rule_fires_on_a_settled_sequence_and_not_on_a_moving_one():
    from ila.importance.stage2 import SettleRule

    settled = SettleRule(tolerance=1e-3, order_tolerance=1e-3, patience=3)
    scores = [3.0, 1.0, 2.0, 0.5]
    fired = [settled.update(step, 1.0 + 1e-6 * step, scores) for step in range(1, 8)]
    assert fired.index(True) == 3 and settled.settled_at == 4  # 3 calm steps after the first
    moving_loss = SettleRule(tolerance=1e-3, order_tolerance=1e-3, patience=3)
    assert not any(moving_loss.update(step, 1.0 / step, scores) for step in range(1, 30))
    moving_order = SettleRule(tolerance=1e-3, order_tolerance=1e-3, patience=3)
    orders = [[3.0, 1.0, 2.0, 0.5], [1.0, 3.0, 2.0, 0.5]]
    assert not any(moving_order.update(step, 1.0, orders[step % 2]) for step in range(1, 30))
    late = SettleRule(tolerance=1e-3, order_tolerance=1e-3, patience=1, min_steps=10)
    assert [late.update(step, 1.0, scores) for step in (1, 2, 10)] == [False, False, True]


def test_stage2_stops_once_settled_and_records_the_cap_otherwise(toy, tmp_path):
    train, _, collator = toy
    model = make_model("llama")
    layers = discover_layers(model)
    s1 = run_stage1(model, layers, train, collator, small_config(epsilon=1e-9, max_steps=20), tmp_path / "s1")
    settles = stage2(s1.model, layers, train, collator, tmp_path / "a", max_steps=400, min_steps=5, interval=5,
                     learning_rate=0.1, tolerance=1e-2, order_tolerance=2e-2, patience=2)
    assert settles.settled_step is not None and settles.steps == settles.settled_step < 400
    assert [step for step, _ in settles.checks] == list(range(5, settles.steps + 1, 5))  # a check every interval
    assert len(settles.losses) == settles.steps  # one logged objective per optimizer step
    for total, task, penalty in zip(settles.losses, settles.task_losses, settles.penalties):
        assert total == pytest.approx(task + penalty, rel=1e-4)
    capped = stage2(s1.model, layers, train, collator, tmp_path / "b", max_steps=4, min_steps=0, interval=2)
    assert capped.settled_step is None and capped.steps == 4


def test_stage2_scores_ignore_lora_dropout(toy, tmp_path):
    """Stage 2 runs the network as at inference: an adapter with dropout 0.3 gets the scores of the same adapter
    with its dropout removed."""
    train, _, collator = toy
    layers = discover_layers(make_model("llama"))
    config = small_config(epsilon=1e-9, max_steps=10)
    config.lora.dropout = 0.3
    s1 = run_stage1(make_model("llama"), layers, train, collator, config, tmp_path / "s1")
    weights = {n: p.detach().clone() for n, p in s1.model.named_parameters()}
    with_dropout = stage2(s1.model, layers, train, collator, tmp_path / "a", max_steps=6).scores
    config.lora.dropout = 0.0
    from ila.importance.stage1 import prepare_lora

    plain = prepare_lora(make_model("llama"), layers, config)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(weights[n])
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in s1.model.modules())
    assert stage2(plain, layers, train, collator, tmp_path / "b", max_steps=6).scores == with_dropout


def test_gradient_accumulation_matches_the_larger_batch(tokenizer, tmp_path):
    """Stage 1 with batch b and accumulation 2 equals batch 2b: same logged loss and gradient norm on every
    step and the same weights at the end, on data whose responses differ in length (token-weighted mean)."""
    import json
    import random

    rng = random.Random(0)
    rows = [{"instruction": " ".join(rng.sample([f"w{i}" for i in range(40)], 4)), "input": "",
             "output": " ".join(f"w{rng.randrange(40, 56)}" for _ in range(rng.randint(1, 9)))} for _ in range(64)]
    path = tmp_path / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _ = load_data(str(path), tokenizer, max_length=32, heldout_fraction=0.0, seed=0)
    collator = collate(tokenizer)
    runs = []
    for batch, accumulation in ((8, 1), (4, 2)):
        config = small_config(epsilon=1e-9, max_steps=6, batch_size=batch, gradient_accumulation_steps=accumulation,
                              warmup_ratio=0.0)
        model = make_model("llama")
        layers = discover_layers(model)
        s1 = run_stage1(model, layers, train, collator, config, tmp_path / f"b{batch}")
        runs.append((s1, {n: p.detach().clone() for n, p in s1.model.named_parameters() if "lora_" in n}))
    (big, big_w), (small, small_w) = runs
    assert small.losses == pytest.approx(big.losses, rel=1e-5)
    for name in big_w:
        assert torch.allclose(big_w[name], small_w[name], atol=1e-4), name  # a mean of micro-batch means: ~0.08


def test_ties_follow_the_tiebreak_and_never_model_order():
    layers = discover_layers(make_model("llama"))
    tied = Ranking.from_scores(layers, [1.0] * len(layers), tiebreak=[float(i) for i in range(len(layers))])
    assert tied.ordered() == layers[::-1]  # higher tiebreak first, whatever the model order
    no_tiebreak = Ranking.from_scores(layers, [1.0] * len(layers))
    assert no_tiebreak.ordered() != layers and no_tiebreak.ordered() != layers[::-1]
    assert sorted(no_tiebreak.ordered(), key=layers.index) == layers  # a permutation, the same every time
    assert no_tiebreak.ordered() == Ranking.from_scores(layers, [1.0] * len(layers)).ordered()
    spread = Ranking.from_scores(layers, [float(i) for i in range(len(layers))])
    assert spread.near_ties(0.75) == 0 and no_tiebreak.near_ties(0.75) == len(layers)
