"""The gate: σ = 1 reproduces the tuned model, σ = 0 the base model; only the scores get gradients."""

import pytest
import torch
from conftest import ARCHITECTURES, make_model
from peft import LoraConfig, get_peft_model

from ila.errors import IlaError
from ila.gates import LayerGates
from ila.layers import discover_layers
from ila.training import response_loss


def lora_model(arch, lora_bias=False):
    model = make_model(arch)
    layers = discover_layers(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[x.name for x in layers],
                                                  lora_bias=lora_bias))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: PEFT initialises lora_B (and its bias) to zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft_model.eval(), layers


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 64, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lora_gate_one_is_peft_output_and_zero_is_base(arch):
    model, layers = lora_model(arch)
    ids = batch()["input_ids"]
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert not torch.allclose(tuned, base, atol=1e-4)  # the adapter changes the output
        gates = LayerGates(layers).attach_lora(model)
        with gates.fixed(1.0):
            torch.testing.assert_close(model(input_ids=ids).logits, tuned)
        with gates.fixed(0.0):
            torch.testing.assert_close(model(input_ids=ids).logits, base)
        gates.detach()
        torch.testing.assert_close(model(input_ids=ids).logits, tuned)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_lora_gate_is_linear_in_the_update(lora_bias):
    """σ scales the whole LoRA branch, bias included: the output at σ = 0.3 lies 30 % of the way to the tuned one."""
    model, layers = lora_model("qwen2", lora_bias=lora_bias)
    gates = LayerGates(layers[:1]).attach_lora(model)
    q_proj = model.base_model.model.get_submodule(layers[0].name)
    x = torch.randn(2, 5, q_proj.in_features)
    with torch.no_grad():
        outputs = {}
        for value in (0.0, 0.3, 1.0):
            with gates.fixed(value):
                outputs[value] = q_proj(x)
        with model.disable_adapter():
            base = q_proj(x)
    off, part, on = outputs[0.0], outputs[0.3], outputs[1.0]
    lora_b = q_proj.lora_B["default"]  # without a bias the product is taken on lora_B's rank-r input
    assert (len(lora_b._forward_pre_hooks), len(lora_b._forward_hooks)) == ((0, 1) if lora_bias else (1, 0))
    torch.testing.assert_close(off, base)
    assert not torch.allclose(on, base, atol=1e-4)
    torch.testing.assert_close(part, off + 0.3 * (on - off))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_full_update_gate(arch):
    model = make_model(arch)
    layers = discover_layers(model)
    initial = {x.name: {n: p.detach().clone() for n, p in model.get_submodule(x.name).named_parameters()}
               for x in layers}
    ids = batch()["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
        for x in layers:
            for p in model.get_submodule(x.name).parameters():
                p.add_(torch.randn_like(p) * 0.3)
        tuned = model(input_ids=ids).logits
        gates = LayerGates(layers).attach_full(model, initial)
        with gates.fixed(1.0):
            torch.testing.assert_close(model(input_ids=ids).logits, tuned)
        with gates.fixed(0.0):
            torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-5, rtol=1e-4)


def test_one_gate_scales_one_layer_only():
    model, layers = lora_model("llama")
    ids = batch()["input_ids"]
    gates = LayerGates(layers).attach_lora(model)
    values = torch.ones(len(layers))
    values[3] = 0.0
    with torch.no_grad(), gates.fixed(values):
        one_off = model(input_ids=ids).logits
    with torch.no_grad(), gates.fixed(1.0):
        all_on = model(input_ids=ids).logits
    assert not torch.allclose(one_off, all_on, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_only_scores_receive_gradients(arch):
    model, layers = lora_model(arch)
    for p in model.parameters():
        p.requires_grad_(False)
    gates = LayerGates(layers, init_score=2.0).attach_lora(model)
    response_loss(model, batch()).backward()
    assert gates.scores.grad is not None
    assert torch.count_nonzero(gates.scores.grad) == len(layers)
    assert all(p.grad is None for p in model.parameters())


def test_lora_variants_are_refused():
    model = make_model("llama")
    layers = discover_layers(model)
    dora = get_peft_model(model, LoraConfig(r=4, target_modules=[x.name for x in layers], use_dora=True))
    with pytest.raises(IlaError, match="LoRA variant .* cannot be gated"):
        LayerGates(layers).attach_lora(dora)
