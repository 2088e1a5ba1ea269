"""`ila export`: each format, read back and applied with the tool's own matching rule to tiny real models, names
exactly the layers the ranking's `--select` picks."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import yaml
from conftest import SMALL, make_model
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from ila.errors import IlaError
from ila.exports import FORMATS, export, peft_config, unfrozen_parameters
from ila.layers import discover_layers
from ila.ranking import Ranking

ARCHS = ("llama", "qwen2", "gpt2")  # qwen2: q/k/v have biases; gpt2: Conv1D, two roles named c_proj
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05}


def ranked(model: torch.nn.Module, tmp_path, seed: int = 0, **metadata) -> tuple[Ranking, object]:
    layers = discover_layers(model)
    rng = random.Random(seed)
    ranking = Ranking.from_scores(layers, [rng.gauss(0, 1) for _ in layers], {"method": "test", **metadata})
    return ranking, ranking.save(tmp_path / "ranking.json")


def lora_modules(model: torch.nn.Module, config: LoraConfig) -> set[str]:
    """Names of the modules PEFT put a LoRA adapter on."""
    base = get_peft_model(model, config).get_base_model()
    return {name for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def axolotl_unfrozen(model: torch.nn.Module, patterns: list[str]) -> set[str]:
    """Parameters axolotl leaves trainable: axolotl-ai-cloud/axolotl src/axolotl/utils/freeze.py (HEAD 067b021c),
    `LayerNamePattern`: a trailing `[start:end]` range is split off, every '.' not followed by '+' is escaped, and
    the pattern is tried with `re.match` on each name of `model.named_parameters()`."""
    compiled = []
    for pattern in patterns:
        assert re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$", pattern) is None  # no range part
        compiled.append(re.compile(re.sub(r"\.(?!\+)", "\\.", pattern)))
    return {name for name, _ in model.named_parameters() if any(c.match(name) for c in compiled)}


def params_of(model: torch.nn.Module, names: set[str]) -> set[str]:
    """Weight and bias names of the named modules."""
    return {f"{n}.{p}" for n in names for p, _ in model.get_submodule(n).named_parameters(recurse=False)}


def uncommented(text: str, key: str) -> dict:
    """The YAML of a commented-out block that starts with '# KEY:'."""
    lines = text.splitlines()
    start = lines.index(f"# {key}:")
    block = []
    for line in lines[start:]:
        if not (line == f"# {key}:" or line.startswith("# - ")):
            break
        block.append(line[2:])
    return yaml.safe_load("\n".join(block))


@pytest.fixture(params=ARCHS)
def case(request, tmp_path):
    arch = request.param
    ranking, path = ranked(make_model(arch), tmp_path, arch=arch)
    chosen = {x.name for x in ranking.top(0.3)}
    assert 0 < len(chosen) < len(ranking.layers)
    return arch, ranking, path, chosen


def test_peft_config_file_loads_and_adapts_exactly_the_selection(case, tmp_path):
    arch, _, path, chosen = case
    folder = tmp_path / "adapter"
    folder.mkdir()
    written = export(path, "top:0.3", "peft", folder, **LORA)
    assert written == folder / "adapter_config.json"
    data = json.loads(written.read_text())
    assert set(data["target_modules"]) == chosen
    config = LoraConfig.from_pretrained(str(folder))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.05)
    assert lora_modules(make_model(arch), config) == chosen
    assert lora_modules(make_model(arch), LoraConfig(**data)) == chosen


def test_peft_config_object(case):
    arch, ranking, path, chosen = case
    config = peft_config(path, "top:0.3", r=2, lora_dropout=0.1)
    assert set(config.target_modules) == chosen and config.r == 2 and config.lora_dropout == 0.1
    assert lora_modules(make_model(arch), config) == chosen
    assert set(peft_config(ranking, "top:0.3").target_modules) == chosen  # a Ranking object works as well


def test_axolotl_lora_targets_and_unfrozen_parameters(case, tmp_path):
    arch, _, path, chosen = case
    text = export(path, "top:0.3", "axolotl", tmp_path / "axolotl.yaml", **LORA).read_text()
    assert f"# from ranking {path} (method test, level layer)" in text
    assert f"# --select top:0.3: {len(chosen)} of " in text
    cfg = yaml.safe_load(text)
    assert cfg["adapter"] == "lora" and cfg["lora_target_linear"] is False and "unfrozen_parameters" not in cfg
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.05)
    # axolotl src/axolotl/loaders/adapter.py: LoraConfig(target_modules=cfg.lora_target_modules, r=cfg.lora_r, ...)
    config = LoraConfig(target_modules=cfg["lora_target_modules"], r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                        lora_dropout=cfg["lora_dropout"], task_type="CAUSAL_LM")
    assert lora_modules(make_model(arch), config) == chosen
    model = make_model(arch)
    patterns = uncommented(text, "unfrozen_parameters")["unfrozen_parameters"]
    assert axolotl_unfrozen(model, patterns) == params_of(model, chosen)


def test_spectrum_unfrozen_parameters(case, tmp_path):
    arch, _, path, chosen = case
    written = export(path, "top:0.3", "spectrum", tmp_path)  # an existing folder: spectrum.yaml inside it
    assert written == tmp_path / "spectrum.yaml"
    text = written.read_text()
    assert text.splitlines()[0].startswith("# Spectrum") and "--select top:0.3" in text
    patterns = yaml.safe_load(text)["unfrozen_parameters"]
    assert patterns[:2] == ["^lm_head.weight$", "^model.embed_tokens.weight$"]  # Spectrum's fixed first lines
    model = make_model(arch)
    params = {n for n, _ in model.named_parameters()}
    fixed = {"lm_head.weight", "model.embed_tokens.weight"} & params  # gpt2: transformer.wte, tied head
    assert axolotl_unfrozen(model, patterns) == params_of(model, chosen) | fixed
    assert axolotl_unfrozen(model, patterns[2:]) == params_of(model, chosen)


def test_llama_factory_lora_target(case, tmp_path):
    arch, _, path, chosen = case
    text = export(path, "top:0.3", "llama-factory", tmp_path / "lf.yaml", **LORA).read_text()
    assert "finetuning_type: freeze cannot express" in text
    cfg = yaml.safe_load(text)
    assert cfg["finetuning_type"] == "lora" and (cfg["lora_rank"], cfg["lora_alpha"]) == (4, 8)
    # LLaMA-Factory src/llamafactory/hparams/finetuning_args.py split_arg, then model/adapter.py target_modules
    targets = [item.strip() for item in cfg["lora_target"].split(",")]
    assert targets != ["all"]
    config = LoraConfig(target_modules=targets, r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"],
                        lora_dropout=cfg["lora_dropout"], task_type="CAUSAL_LM")
    assert lora_modules(make_model(arch), config) == chosen


def test_block_prefixes_do_not_leak(tmp_path):
    """Block 1's layers, in a model that also has blocks 10 and 11: no format may touch those."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 12})).eval()
    _, path = ranked(model, tmp_path)
    chosen = {x.name for x in discover_layers(model) if x.block == 1}
    select = r"names:^model\.layers\.1\."
    assert set(peft_config(path, select).target_modules) == chosen
    assert lora_modules(model, peft_config(path, select)) == chosen
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 12}))
    patterns = yaml.safe_load(export(path, select, "spectrum", tmp_path / "s.yaml").read_text())
    assert axolotl_unfrozen(fresh, patterns["unfrozen_parameters"][2:]) == params_of(fresh, chosen)
    assert axolotl_unfrozen(fresh, unfrozen_parameters(sorted(chosen))) == params_of(fresh, chosen)


def test_block_level_ranking_exports_whole_blocks(tmp_path):
    layers = discover_layers(make_model("llama"))
    ranking = Ranking.from_scores(layers, [float(x.block) for x in layers], {"method": "bi", "level": "block"})
    path = ranking.save(tmp_path / "ranking.json")
    config = peft_config(path, "top:0.5")
    assert set(config.target_modules) == {x.name for x in layers if x.block == 1}
    assert "level block" in export(path, "top:0.5", "spectrum", tmp_path / "s.yaml").read_text()
    with pytest.raises(IlaError, match="ranks blocks"):
        peft_config(ranking.by_block(), "top:0.5")


def one_line_error(call, *patterns: str) -> str:
    with pytest.raises(IlaError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for pattern in patterns:
        assert pattern in message
    return message


def test_errors(tmp_path):
    _, path = ranked(make_model("llama"), tmp_path)
    out = tmp_path / "out.yaml"
    one_line_error(lambda: export(path, "top:0.3", "unsloth", out), "unsloth", ", ".join(FORMATS))
    one_line_error(lambda: export(path, "names:^nothing$", "peft", out), "names:^nothing$", str(path),
                   "selects no layer")
    one_line_error(lambda: peft_config(path, "top:2"), "top:2", str(path))
    one_line_error(lambda: peft_config(path, "top:0.3", r=4, foo=1), "'foo'", "LoraConfig")
    one_line_error(lambda: peft_config(path, "top:0.3", r=0), "r=0")
    one_line_error(lambda: peft_config(path, "top:0.3", lora_dropout=1.5), "lora_dropout")
    one_line_error(lambda: peft_config(path, "top:0.3", target_modules=["x"]), "target_modules")
    one_line_error(lambda: export(path, "top:0.3", "spectrum", out, r=8), "spectrum", "r")
    one_line_error(lambda: export(path, "top:0.3", "axolotl", out, use_dora=True), "axolotl", "use_dora")
    one_line_error(lambda: export(tmp_path / "missing.json", "top:0.3", "peft", out), "file not found")
    assert not out.exists()
    # None means "not given" (the CLI's unset options)
    assert "lora_r" not in yaml.safe_load(export(path, "top:0.3", "axolotl", out, r=None).read_text())



def test_command_line(tmp_path, capsys):
    """`ila export RANKING --select ... --format ... --out FILE`, and `ila.export`/`ila.peft_config` on the package;
    bad input is one line and exit 2."""
    import ila
    from ila.cli import main

    ranking, path = ranked(make_model("llama"), tmp_path)
    out = tmp_path / "adapter_config.json"
    assert main(["export", str(path), "--select", "top:0.5", "--format", "peft", "--out", str(out), "--r", "8"]) == 0
    written = LoraConfig(**{k: v for k, v in json.loads(out.read_text()).items() if k != "peft_version"})
    assert written.r == 8 and set(written.target_modules) == {x.name for x in ranking.top(0.5)}
    assert set(ila.peft_config(path, "top:0.5").target_modules) == set(written.target_modules)
    assert ila.export(path, "top:0.5", "spectrum", tmp_path / "s.yaml").is_file()
    assert main(["export", str(path), "--format", "yaml", "--out", str(tmp_path / "x")]) == 2
    assert main(["export", str(path), "--select", "names:nothing", "--format", "peft", "--out",
                 str(tmp_path / "y.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("ila: error: export: unknown format 'yaml'") and "selects no layer" in err[1]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.json").exists()
