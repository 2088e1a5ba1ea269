"""The importance-method interface: registry, config sections, API, CLI, compare; and the update-norm method."""

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import make_model

import ila
from ila.cli import main
from ila.config import IdentifyConfig, load_config, with_overrides
from ila.errors import IlaError
from ila.importance.base import NEEDS_MODEL, ImportanceMethod, Scores, register, unregister
from ila.importance.stage1 import Update, prepare_full, prepare_lora
from ila.layers import discover_layers
from ila.options import option, positive
from ila.ranking import Ranking

FAST = ["--max-steps", "4", "--stage2-steps", "3", "--max-length", "32"]


@dataclass
class DepthOptions:
    power: float = option(1.0, "exponent of the block depth", check=positive, flag="--depth-power")


def _depth_score(inputs):
    """Deeper blocks score higher: block ** power (a known answer)."""
    return Scores([float(x.block + 1) ** inputs.options.power for x in inputs.layers], {"power": inputs.options.power})


@pytest.fixture
def depth_method():
    register(ImportanceMethod(name="toy-depth", summary="block depth to a power (a test method)",
                              needs=frozenset({NEEDS_MODEL}), score=_depth_score, options=DepthOptions,
                              title="depth"))
    yield "toy-depth"
    unregister("toy-depth")


def test_a_method_added_in_one_place_reaches_cli_config_api_and_compare(depth_method, model_dirs, data_file,
                                                                       tmp_path, capsys):
    assert main(["identify", "--list-methods"]) == 0
    listed = capsys.readouterr().out
    assert "toy-depth" in listed and "block depth to a power" in listed and "ila " in listed

    config = tmp_path / "c.yaml"
    config.write_text("method: toy-depth\nmax_length: 32\ntoy-depth: {power: 2}\n")
    loaded = load_config(config)
    assert loaded.options().power == 2.0
    config_typo = tmp_path / "typo.yaml"
    config_typo.write_text("method: toy-depth\ntoy-depth: {powr: 2}\n")
    with pytest.raises(IlaError, match="unknown key 'toy-depth.powr'"):
        load_config(config_typo)
    with pytest.raises(IlaError, match="toy-depth.power: -1.0 must be > 0"):
        load_config(None, {"method": "toy-depth", "toy-depth.power": -1})

    # the CLI takes its flag, the run writes the method's name and settings
    out = tmp_path / "cli"
    code = main(["identify", "--model", str(model_dirs("llama")), "--data", str(data_file), "--out", str(out),
                 "--method", "toy-depth", "--depth-power", "3", "--max-length", "32"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "ranking.json").read_text())
    assert data["metadata"]["method"] == "toy-depth" and data["metadata"]["method_config"] == {"power": 3.0}
    assert "gate" not in data["layers"][0]  # gates are ILA's alone
    assert [x["score"] for x in data["layers"]] == [float(x["block"] + 1) ** 3 for x in data["layers"]]
    assert not (out / "adapter").exists()  # it needs no stage-1 update, so none was trained

    # the API, with the same keyword
    ranking = ila.identify(tmp_path / "api", model=str(model_dirs("llama")), data=str(data_file), max_length=32,
                           method="toy-depth", depth_power=2)
    assert ranking.method == "toy-depth" and ranking.metadata["method_config"] == {"power": 2.0}
    assert [e.score for e in ranking.entries] == [float(x.block + 1) ** 2 for x in ranking.layers]

    # compare labels each ranking by its method
    ila_run = tmp_path / "ila"
    assert main(["identify", "--model", str(model_dirs("llama")), "--data", str(data_file), "--out",
                 str(ila_run), *FAST]) == 0
    capsys.readouterr()
    assert main(["compare", str(out / "ranking.json"), str(ila_run / "ranking.json"),
                 str(tmp_path / "api" / "ranking.json")]) == 0
    text = capsys.readouterr().out
    assert "(toy-depth · " in text and "(ila · " in text  # labelled by method, data and seed


def test_unknown_method_lists_the_known_ones(depth_method):
    with pytest.raises(IlaError, match=r"'nope' is not a known importance method \(known: .*ila.*toy-depth"):
        load_config(None, {"method": "nope"})


def test_method_options_under_another_method_are_refused(depth_method):
    with pytest.raises(IlaError, match="ila: options for method 'ila', but the method is 'toy-depth'"):
        load_config(None, {"method": "toy-depth", "ila.max_steps": 5})


def test_a_method_that_uses_no_update_refuses_an_adapter(depth_method, tmp_path):
    with pytest.raises(IlaError, match="uses no stage-1 update"):
        ila.identify(tmp_path / "x", method="toy-depth", adapter=str(tmp_path))
    assert not (tmp_path / "x" / "ranking.json").exists()


def test_identify_config_defaults_fill_the_running_methods_options():
    config = IdentifyConfig().validate()
    assert config.options().max_steps > 0 and config.method == "ila"
    assert load_config(None, {"method": "update-norm"}).options().relative is False


def test_rankings_from_the_previous_version_still_load(tmp_path):
    old = {"format": "ila.ranking", "version": 1,
           "layers": [{"name": "model.layers.0.mlp.up_proj", "block": 0, "role": "up_proj", "score": 2.0,
                       "gate": 0.88},
                      {"name": "model.layers.1.mlp.up_proj", "block": 1, "role": "up_proj", "score": -1.0,
                       "gate": 0.27}],
           "metadata": {"method": "ila-lora", "model": "m"}}
    for method in ("ila-lora", "ila-full", "stage2-on-adapter"):
        path = tmp_path / f"{method}.json"
        path.write_text(json.dumps({**old, "metadata": {**old["metadata"], "method": method}}))
        ranking = Ranking.load(path)
        assert ranking.method == "ila" and ranking.gates and ranking.scores()["model.layers.1.mlp.up_proj"] == -1.0
        again = ranking.save(tmp_path / "again.json")
        assert json.loads(again.read_text())["layers"][0]["gate"] == pytest.approx(0.8808, abs=1e-4)


@pytest.mark.parametrize("arch, full", [("llama", False), ("gpt2", False), ("qwen2", True)])
def test_update_norm_equals_the_frobenius_norms_computed_by_hand(arch, full):
    from ila.importance.base import Inputs
    from ila.importance.update_norm import UpdateNormOptions, score

    model = make_model(arch)
    layers = discover_layers(model)
    config = IdentifyConfig().validate()
    torch.manual_seed(1)
    if full:
        initial = prepare_full(model, layers)
        with torch.no_grad():
            for x in layers:
                model.get_submodule(x.name).weight.add_(torch.randn_like(model.get_submodule(x.name).weight))
        update = Update(model, layers, initial)
        by_hand = [float((model.get_submodule(x.name).weight - initial[x.name]["weight"]).pow(2).sum().sqrt())
                   for x in layers]
        bases = [float(initial[x.name]["weight"].pow(2).sum().sqrt()) for x in layers]
    else:
        config.lora.r, config.lora.alpha = 4, 8
        peft_model = prepare_lora(model, layers, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        update = Update(peft_model, layers)
        by_hand, bases = [], []
        for x in layers:
            module = peft_model.base_model.model.get_submodule(x.name)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            by_hand.append(float((2.0 * b @ a).pow(2).sum().sqrt()))  # scaling alpha / r = 2
            bases.append(float(module.get_base_layer().weight.pow(2).sum().sqrt()))
    for relative in (False, True):
        result = score(Inputs(config=config, options=UpdateNormOptions(relative=relative), layers=layers,
                              update=update))
        expected = [h / b for h, b in zip(by_hand, bases)] if relative else by_hand
        assert result.scores == pytest.approx(expected, rel=1e-5)


def test_a_method_chosen_on_the_command_line_drops_the_files_sections_for_other_methods(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("ila: {max_steps: 7}\n")
    assert load_config(config).options().max_steps == 7
    assert load_config(config, {"method": "update-norm"}).method_options.keys() == {"update-norm"}
    with pytest.raises(IlaError, match="options for method 'ila'"):
        load_config(config, {"method": "update-norm", "ila.max_steps": 3})  # given with the override: refused
    in_memory = load_config(config)
    assert with_overrides(in_memory, {"method": "update-norm", "update-norm.relative": True}).options().relative


def test_a_held_out_fixed_set_needs_a_held_out_split():
    with pytest.raises(IlaError, match="ila.data: 'heldout' needs heldout_fraction > 0"):
        load_config(None, {"ila.data": "heldout", "heldout_fraction": 0})


def test_update_norm_on_an_adapter_reads_no_data(model_dirs, data_file, tmp_path, capsys):
    ila_run = tmp_path / "ila"
    assert main(["identify", "--model", str(model_dirs("llama")), "--data", str(data_file), "--out", str(ila_run),
                 *FAST]) == 0
    out = tmp_path / "norm"
    code = main(["identify", "--model", str(model_dirs("llama")), "--data", str(tmp_path / "missing.jsonl"),
                 "--method", "update-norm", "--adapter", str(ila_run / "adapter"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err  # the data file does not exist: it was never read
    data = json.loads((out / "ranking.json").read_text())
    assert data["metadata"]["method"] == "update-norm" and data["metadata"]["data"] is None
    assert all(x["score"] > 0 for x in data["layers"])


def test_data_seed_fixes_identify_sample_and_split_across_training_seeds(model_dirs, data_file):
    from ila.importance.job import load_inputs

    def rows(seed, data_seed):
        config = load_config(None, {"model": str(model_dirs("llama")), "data": str(data_file), "seed": seed,
                                    "data_seed": data_seed, "max_examples": 60, "heldout_fraction": 0.25})
        loaded = load_inputs(config)
        return sorted(map(tuple, loaded.train["input_ids"])), sorted(map(tuple, loaded.heldout["input_ids"]))

    assert rows(0, 3) == rows(1, 3)  # the training seed alone leaves sample and split as they are
    assert rows(0, None) != rows(1, None)  # without a data seed, the seed draws both
    assert rows(3, None) == rows(0, 3)
