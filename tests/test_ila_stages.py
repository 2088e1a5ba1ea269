"""Stage 1 trains until ε-stable or the cap; stage 2 learns scores that separate helpful from harmful updates."""

from pathlib import Path

import pytest
import torch
from conftest import make_model

from ila.config import IdentifyConfig
from ila.data import collate, load_data
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
    c.stage2.steps, c.stage2.batch_size, c.stage2.learning_rate = 30, 8, 0.3
    return c


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
    s2 = run_stage2(peft_model, layers, train, collator, config, tmp_path / "s2")
    ranking = Ranking.from_scores(layers, s2.scores)
    bottom = {x.name for x in ranking.bottom(len(harmful) / len(layers))}
    assert bottom == harmful
    # Stage 2 changes nothing but the scores.
    for name, p in peft_model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert s2.losses[-1] < s2.losses[0]


def test_full_finetuning_stage1_and_gated_stage2(toy, tmp_path):
    train, heldout, collator = toy
    model = make_model("qwen2")
    layers = discover_layers(model)
    config = small_config(method="full", learning_rate=1e-3, max_steps=15, epsilon=1e-9)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "layers" not in n or "norm" in n}
    s1 = run_stage1(model, layers, train, collator, config, tmp_path / "s1")
    assert s1.initial is not None and set(s1.initial) == {x.name for x in layers}
    for name, p in s1.model.named_parameters():  # only the gated linear layers moved
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    moved = [x for x in layers if not torch.equal(s1.model.get_submodule(x.name).weight, s1.initial[x.name]["weight"])]
    assert len(moved) == len(layers)
    s2 = run_stage2(s1.model, layers, train, collator, config, tmp_path / "s2", initial=s1.initial)
    assert len(s2.scores) == len(layers) and len(set(s2.scores)) > 1


def test_same_seed_same_ranking(toy, tmp_path: Path):
    train, _, collator = toy
    scores = []
    for run in range(2):
        model = make_model("gpt2")
        layers = discover_layers(model)
        config = small_config(epsilon=1e-9, max_steps=10)
        config.stage2.steps = 8
        s1 = run_stage1(model, layers, train, collator, config, tmp_path / f"a{run}")
        scores.append(run_stage2(s1.model, layers, train, collator, config, tmp_path / f"b{run}").scores)
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
        config.seed, config.stage2.steps = seed, 8
        s1 = run_stage1(model, layers, train, collator, config, tmp_path / f"a{seed}")
        scores.append(run_stage2(s1.model, layers, train, collator, config, tmp_path / f"b{seed}").scores)
    assert scores[0] != scores[1]
