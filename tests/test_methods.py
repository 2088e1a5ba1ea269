"""Importance methods with known answers: ila-fast and grad-norm on tiny random-init models."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from ila.config import load_config
from ila.data import collate, load_data
from ila.importance.base import Inputs
from ila.importance.stage1 import Update, prepare_full, run_stage1
from ila.layers import base_model_of, discover_layers
from ila.ranking import Ranking


@pytest.fixture(scope="module")
def toy(data_file, tokenizer):
    train, _ = load_data(str(data_file), tokenizer, max_length=32, heldout_fraction=0.0, seed=0)
    return train, collate(tokenizer)


def _inputs(method, train, collator, layers, **kw):
    config = load_config(None, {"method": method})
    return Inputs(config=config, options=config.options(), layers=layers, train=train, collator=collator, **kw)


@pytest.mark.parametrize("arch, harmful", [("llama", 6), ("qwen2", 6), ("llama", 12)])
def test_ila_fast_puts_a_negated_update_at_the_bottom(arch, harmful, toy, tmp_path):
    """One learned update turned harmful (ΔW → −ΔW) ranks last. (With several, a first-order signal can miss one
    whose harm shows only through the others: docs/importance-methods.md.)"""
    from ila.importance.ila_fast import score

    train, collator = toy
    layers = discover_layers(make_model(arch))
    config = load_config(None, {"lora.r": 4, "lora.alpha": 16, "lora.dropout": 0.0, "stage1.max_steps": 60,
                                "stage1.learning_rate": 2e-2, "stage1.batch_size": 8, "stage1.epsilon": 1e-9})
    s1 = run_stage1(make_model(arch), layers, train, collator, config, tmp_path)
    name = layers[harmful].name  # 6: block 0 down_proj, 12: block 1 up_proj
    with torch.no_grad():
        for pname, p in s1.model.named_parameters():
            if f"{name}.lora_B" in pname:
                p.neg_()
    scored = score(_inputs("ila-fast", train, collator, layers, update=Update(s1.model, layers)))
    assert Ranking.from_scores(layers, scored.scores).ordered()[-1].name == name


def test_ila_fast_is_the_inner_product_of_the_gradient_with_the_update(toy):
    """−∂L/∂γᵢ at γ = 1 = −⟨∇_{θᵢ}L(θ_t), θ_t − θ₀⟩ over weight and bias (seeds/000 Eq. 7 linearised)."""
    from ila.importance.ila_fast import score

    train, collator = toy
    model = make_model("qwen2")  # q/k/v projections carry biases
    layers = discover_layers(model)
    initial = prepare_full(model, layers)
    torch.manual_seed(3)
    with torch.no_grad():
        for x in layers:
            for p in model.get_submodule(x.name).parameters():
                p.add_(0.05 * torch.randn_like(p))
    data = train.shuffle(seed=0).select(range(64))
    batch = collator([data[i] for i in range(64)])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    params = {x.name: dict(model.get_submodule(x.name).named_parameters()) for x in layers}
    grads = torch.autograd.grad(loss, [p for x in layers for p in params[x.name].values()])
    by_hand, k = [], 0
    for x in layers:
        total = 0.0
        for pname, p in params[x.name].items():
            total += float((grads[k] * (p.detach() - initial[x.name][pname])).sum())
            k += 1
        by_hand.append(-total)
    scored = score(_inputs("ila-fast", train, collator, layers, update=Update(model, layers, initial)))
    assert scored.scores == pytest.approx(by_hand, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grad_norm_matches_a_hand_computation(arch, toy):
    from ila.importance.grad_norm import score

    train, collator = toy
    model = make_model(arch)
    layers = discover_layers(model)
    inputs = _inputs("grad-norm", train, collator, layers, model=model)
    inputs.options.batches, inputs.options.batch_size = 3, 4
    scored = score(inputs)
    hand = make_model(arch)
    base = base_model_of(hand)
    weights = [base.get_submodule(x.name).weight for x in layers]
    data = train.shuffle(seed=0).select(range(12))
    totals = torch.zeros(len(layers), dtype=torch.float64)
    for start in range(0, 12, 4):
        batch = collator([data[i] for i in range(start, start + 4)])
        logits = hand(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        grads = torch.autograd.grad(loss, weights)
        totals += torch.tensor([float(g.pow(2).mean()) for g in grads], dtype=torch.float64)
    assert scored.scores == pytest.approx((totals / 3).tolist(), rel=1e-4)
    assert len(set(scored.scores)) == len(layers)  # every layer gets its own value
