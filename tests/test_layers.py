import pytest
from conftest import ARCHITECTURES, make_model
from peft import LoraConfig, get_peft_model

from ila.errors import IlaError
from ila.layers import discover_layers, find_blocks

EXPECTED_ROLES = {
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    **{a: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for a in ("llama", "mistral", "qwen2", "gemma3", "olmo2")},
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_discovers_every_linear_layer_in_the_blocks(arch):
    model = make_model(arch)
    layers = discover_layers(model)
    _, blocks = find_blocks(model)
    assert len(blocks) == 2
    for block in range(2):
        assert [layer.role for layer in layers if layer.block == block] == EXPECTED_ROLES[arch]
    for layer in layers:
        module = model.get_submodule(layer.name)
        assert hasattr(module, "weight")
        assert f".{layer.block}." in layer.name
    assert "lm_head" not in {layer.role for layer in layers}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_layers_after_peft_wrapping(arch):
    model = make_model(arch)
    before = discover_layers(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=[x.name for x in before]))
    assert discover_layers(wrapped) == before


def test_role_filter_and_no_match():
    model = make_model("llama")
    assert {x.role for x in discover_layers(model, ["q_proj", "v_proj"])} == {"q_proj", "v_proj"}
    assert {x.role for x in discover_layers(model, [".*_proj"])} == set(EXPECTED_ROLES["llama"])
    with pytest.raises(IlaError, match="no linear layers.*nonexistent"):
        discover_layers(model, ["nonexistent"])
