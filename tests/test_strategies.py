"""Training strategies (`ila train --strategy`): LISA frees what it does not train and updates what it samples,
IST learns which blocks matter, Mid-Block adapts the right segments at a matched budget; all run under DDP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, make_tokenizer
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    TrainerState,
    TrainingArguments,
)

import ila
from ila.cli import main
from ila.config import TrainConfig, load_config
from ila.data import build_dataset, collate, load_examples
from ila.errors import IlaError
from ila.layers import discover_layers
from ila.ranking import Ranking
from ila.training.strategies.base import Context, get_strategy, strategies
from ila.training.strategies.midblock import matched_rank, segment_blocks


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Saved tiny models with more blocks than conftest's: llama with 6, mistral with 7."""
    root = tmp_path_factory.mktemp("deep")
    folders = {}
    for name, cls, config_cls, depth in (("llama6", LlamaForCausalLM, LlamaConfig, 6),
                                         ("mistral7", MistralForCausalLM, MistralConfig, 7)):
        torch.manual_seed(0)
        cls(config_cls(**{**SMALL, "num_hidden_layers": depth})).save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
        folders[name] = root / name
    return folders


def train(folder, data_file, out, **overrides):
    config = load_config(None, {"model": str(folder), "data": str(data_file), "max_steps": 4, "batch_size": 4,
                                "max_length": 32, "save_steps": 100, "lora.r": 4, **overrides}, TrainConfig)
    return ila.train(out, config=config)


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def changed_blocks(before: dict, after: dict) -> tuple[set[int], set[int]]:
    """Blocks with every weight changed, and blocks with any weight changed."""
    every: dict[int, bool] = {}
    for name, value in before.items():
        b = block_of(name)
        if b is not None and name.endswith(".weight") and "norm" not in name:
            every[b] = every.get(b, True) and not torch.equal(value, after[name])
    anyc = {block_of(n) for n, v in before.items() if block_of(n) is not None and not torch.equal(v, after[n])}
    return {b for b, c in every.items() if c}, anyc


# -- LISA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lisa_updates_the_sampled_blocks_and_leaves_the_others_bit_identical(deep, data_file, tmp_path,
                                                                              checkpointing):
    before = load_file(deep["llama6"] / "model.safetensors")
    run = train(deep["llama6"], data_file, tmp_path / "run", method="full", strategy="lisa", max_steps=3,
                learning_rate=1e-3, gradient_checkpointing=checkpointing, **{"lisa.layers": 2, "lisa.interval": 3})
    schedule = json.loads((tmp_path / "run" / "run.json").read_text())["strategy_record"]["lisa_schedule"]
    assert len(schedule) == 1 and len(schedule[0]["active"]) == 2  # one interval
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    every, anyc = changed_blocks(before, after)
    assert every >= set(schedule[0]["active"])
    assert anyc == set(schedule[0]["active"])  # the 4 blocks not sampled: bit-identical
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert run.cost["steps"] == 3


def test_lisa_without_embeddings_freezes_them(deep, data_file, tmp_path):
    before = load_file(deep["llama6"] / "model.safetensors")
    train(deep["llama6"], data_file, tmp_path / "run", method="full", strategy="lisa", max_steps=2,
          learning_rate=1e-3, **{"lisa.layers": 1, "lisa.train_embeddings": False})
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(before[name], after[name]), name


def test_lisa_block_first_sampled_late_still_updates(deep, data_file, tmp_path):
    """Cyclic γ = 1, interval 1: block 5 is first sampled at the last step, long after the optimizer was built."""
    before = load_file(deep["llama6"] / "model.safetensors")
    train(deep["llama6"], data_file, tmp_path / "run", method="full", strategy="lisa", max_steps=6,
          learning_rate=1e-3, **{"lisa.layers": 1, "lisa.interval": 1, "lisa.sampling": "cyclic"})
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["active"] for s in run["strategy_record"]["lisa_schedule"]] == [[b] for b in range(6)]
    every, _ = changed_blocks(before, load_file(tmp_path / "run" / "model" / "model.safetensors"))
    assert every == set(range(6))


def test_lisa_optimizer_state_tracks_the_active_set_after_every_switch(deep, data_file, tmp_path):
    run = train(deep["llama6"], data_file, tmp_path / "run", method="full", strategy="lisa", max_steps=8,
                **{"lisa.layers": 2, "lisa.interval": 2})
    schedule = json.loads((tmp_path / "run" / "run.json").read_text())["strategy_record"]["lisa_schedule"]
    assert [s["step"] for s in schedule] == [0, 2, 4, 6]
    assert len({tuple(s["active"]) for s in schedule}) > 1  # the active set really moves
    for switch in schedule:  # AdamW: two moments per trained parameter (+ one step counter per tensor)
        need = 2 * switch["active_param_bytes"]
        assert need <= switch["optimizer_state_bytes"] <= 1.05 * need
    # the state held at the end is exactly the last active set's, nothing from earlier blocks
    inner = getattr(run.trainer.optimizer, "optimizer", run.trainer.optimizer)
    with_state = {block_of(n) for n, p in run.model.named_parameters() if p in inner.state}
    assert with_state - {None} == set(schedule[-1]["active"])
    assert 0 < run.cost["start_memory_mb"] <= run.cost["peak_memory_mb"]  # the floor the peak grows from


def test_lisa_resumes_the_same_schedule_and_weights(deep, data_file, tmp_path):
    options = {"method": "full", "strategy": "lisa", "max_steps": 6, "save_steps": 2, "learning_rate": 1e-3,
               "lisa.layers": 2, "lisa.interval": 2}
    train(deep["llama6"], data_file, tmp_path / "whole", **options)
    train(deep["llama6"], data_file, tmp_path / "cut", **options)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-6")  # as if stopped after step 4
    (tmp_path / "cut" / "run.json").unlink()
    config = load_config(None, {"model": str(deep["llama6"]), "data": str(data_file), "batch_size": 4,
                                "max_length": 32, "lora.r": 4, **options}, TrainConfig)
    ila.train(tmp_path / "cut", config=config, resume=True)
    runs = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("whole", "cut")]
    assert runs[0]["strategy_record"]["lisa_schedule"] == runs[1]["strategy_record"]["lisa_schedule"]
    weights = [load_file(tmp_path / name / "model" / "model.safetensors") for name in ("whole", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_lisa_sampling_by_ranking_favours_important_blocks(deep, data_file, tmp_path):
    from ila.training.strategies.lisa import LisaOptions, active_blocks, block_weights

    layers = discover_layers(LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 6})))
    ranking = Ranking.from_scores(layers, [float(x.block) for x in layers])  # block 5 most important
    weights = block_weights(ranking, 6)
    assert weights == [1, 2, 3, 4, 5, 6]
    drawn = [b for k in range(300) for b in active_blocks(LisaOptions(layers=1, sampling="ranking"), 6, k, 0, weights)]
    assert drawn.count(5) > 3 * drawn.count(0)
    # the same (seed, interval) draws the same blocks: a resumed run continues the schedule
    assert active_blocks(LisaOptions(), 6, 7, 3) == active_blocks(LisaOptions(), 6, 7, 3)
    path = ranking.save(tmp_path / "ranking.json")
    train(deep["llama6"], data_file, tmp_path / "run", method="full", strategy="lisa", rankings=[str(path)],
          max_steps=4, **{"lisa.sampling": "ranking", "lisa.interval": 1, "lisa.layers": 1})
    schedule = json.loads((tmp_path / "run" / "run.json").read_text())["strategy_record"]["lisa_schedule"]
    assert [s["active"] for s in schedule] == [active_blocks(LisaOptions(layers=1, interval=1, sampling="ranking"),
                                                             6, k, 0, weights) for k in range(4)]


# -- IST -------------------------------------------------------------------------------------------------------


def test_ist_scores_rise_for_a_block_whose_suppression_raises_the_loss(deep, data_file):
    """Block 2's base weights are moved by −Δ and its LoRA update is +Δ: the tuned model is the original one, and
    suppressing block 2's update (β = 0.25) leaves a large perturbation, so its loss rises."""
    config = load_config(None, {"model": str(deep["llama6"]), "data": str(data_file), "strategy": "ist",
                                "lora.r": 4, "lora.dropout": 0.0, "ist.interval": 1}, TrainConfig)
    model, tokenizer = ila.load_model(str(deep["llama6"]))
    layers = discover_layers(model)
    train_set = build_dataset(load_examples(str(data_file)), tokenizer, max_length=32)
    plan = get_strategy("ist").prepare(Context(config, config.options(), model, layers, [], train_set,
                                               collate(tokenizer)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for x in layers:
            if x.block == 2:
                module = plan.model.base_model.model.get_submodule(x.name)
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=generator) * 2)
                module.base_layer.weight -= module.scaling["default"] * (b @ a)
    callback = plan.callbacks[0]
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    for step in range(1, 13):
        callback.on_step_begin(args, TrainerState(global_step=step), None)
    scores = plan.record()["scores"]
    assert max(range(6), key=scores.__getitem__) == 2, scores
    assert plan.record()["rounds"] == 12


def test_ist_run_writes_a_block_level_ranking_that_compare_reads(deep, data_file, tmp_path):
    run = train(deep["llama6"], data_file, tmp_path / "run", strategy="ist", max_steps=6,
                **{"ist.interval": 2, "ist.update_fraction": 0.34})
    record = json.loads((tmp_path / "run" / "run.json").read_text())["strategy_record"]
    assert record["update_blocks"] == 3 and record["rounds"] == 2
    assert sum(record["updated_steps"]) == 3 * 6  # N_u blocks updated at each of the 6 steps
    ranking = Ranking.load(tmp_path / "run" / "ranking.json")
    assert ranking.metadata["method"] == "ist" and ranking.metadata["level"] == "block"
    by_block = {e.layer.block: e.score for e in ranking.entries}
    assert [by_block[b] for b in range(6)] == pytest.approx(record["scores"])
    assert len(set(record["scores"])) > 1  # the rounds moved the scores
    comparison = ila.compare([ranking, ranking], labels=["a", "b"], level="block")
    assert comparison.spearman[0][1] == pytest.approx(1.0)
    assert run.selection.fraction == 1.0


# -- Mid-Block ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "segments", "expected"), [
    (7, "01100", [[0, 1], [2, 3], [4], [5], [6]]),  # 7 = 5·1 + 2: the first two segments hold one more block
    (6, "00110", [[0, 1], [2], [3], [4], [5]]),
    (10, "010", [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]),
    (5, "11111", [[0], [1], [2], [3], [4]]),
])
def test_segments_split_the_blocks_contiguously_and_as_equal_as_possible(depth, segments, expected):
    assert segment_blocks(segments, depth) == expected


def test_midblock_adapts_the_marked_segments_at_all_layer_loras_budget(deep, data_file, tmp_path):
    run = train(deep["mistral7"], data_file, tmp_path / "run", strategy="midblock", max_steps=2,
                **{"midblock.segments": "01100"})
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert {block_of(n) for n in selection["trained"]} == {2, 3, 4}  # segments 2 and 3 of 7 = 5·1 + 2 blocks
    assert selection["segment_blocks"] == [[0, 1], [2, 3], [4], [5], [6]]
    assert set(selection["ranks"]) == set(selection["trained"])
    rank = next(iter(selection["ranks"].values()))
    assert set(selection["ranks"].values()) == {rank} and rank == matched_rank(4, 7, 3) == 9
    base = run.model.base_model.model
    layers = discover_layers(run.model)

    def cost(xs):
        return sum(base.get_submodule(x.name).in_features + base.get_submodule(x.name).out_features for x in xs)

    adapted = [x for x in layers if x.block in (2, 3, 4)]
    assert abs(rank * cost(adapted) - 4 * cost(layers)) <= cost(adapted) / 2  # within half a rank step
    assert run.cost["trainable_params"] == rank * cost(adapted)
    peft_config = run.model.peft_config["default"]
    assert peft_config.r == rank and peft_config.lora_alpha == pytest.approx(32.0 * rank / 4)


def test_midblock_on_gpt2_conv1d_layers(model_dirs, data_file, tmp_path):
    """GPT-2's projections are Conv1D (weight d_in × d_out): the budget counts them like nn.Linear."""
    run = train(model_dirs("gpt2"), data_file, tmp_path / "run", strategy="midblock", max_steps=1,
                **{"midblock.segments": "01"})
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert {block_of(n.replace(".h.", ".layers.")) for n in selection["trained"]} == {1}
    assert set(selection["ranks"].values()) == {8}  # rank 4 over two blocks, concentrated on one
    assert run.cost["trainable_params"] == selection["all_layer_lora_params"]


def test_midblock_keep_rank_keeps_lora_r(deep, data_file, tmp_path):
    train(deep["llama6"], data_file, tmp_path / "run", strategy="midblock", max_steps=1,
          **{"midblock.segments": "001", "midblock.keep_rank": True})
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert set(selection["ranks"].values()) == {4} and {block_of(n) for n in selection["trained"]} == {4, 5}


# -- registry, config, CLI ----------------------------------------------------------------------------------


def test_the_registry_finds_every_strategy_file():
    files = {p.stem for p in (Path(ila.__file__).parent / "training" / "strategies").glob("*.py")}
    assert set(strategies()) == files - {"base", "__init__"} == {"selection", "lisa", "ist", "midblock"}


def test_yaml_sections_hold_a_strategys_options(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("strategy: lisa\nmethod: full\nlisa: {layers: 3, sampling: cyclic}\n")
    config = load_config(path, {}, TrainConfig)
    assert config.options().layers == 3 and config.options().sampling == "cyclic"
    assert load_config(path, {"lisa.layers": 5}, TrainConfig).options().layers == 5
    path.write_text("strategy: ist\nlisa: {layers: 3}\n")
    with pytest.raises(IlaError, match="options for strategy 'lisa', but the strategy is 'ist'"):
        load_config(path, {}, TrainConfig)


def test_list_strategies(capsys):
    assert main(["train", "--list-strategies"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.strip().splitlines()] == ["ist", "lisa", "midblock", "selection"]


BAD = [
    (["--strategy", "sparse"], "strategy: 'sparse' is not a known training strategy (known: ist, lisa, midblock, "
                               "selection)"),
    (["--strategy", "lisa", "--method", "full", "--lisa-layers", "7"], "lisa.layers: γ = 7 is more than the "
                                                                        "model's 6 decoder blocks"),
    (["--strategy", "lisa"], "method: strategy lisa trains with full, not 'lora'"),
    (["--strategy", "midblock", "--segments", ""], "midblock.segments: '' is empty"),
    (["--strategy", "midblock", "--segments", "01a"], "midblock.segments: '01a' is not a string of 0 and 1"),
    (["--strategy", "midblock", "--segments", "000"], "midblock.segments: '000' marks no segment"),
    (["--strategy", "midblock", "--segments", "0110100"], "midblock.segments: '0110100' has 7 segments but the "
                                                           "model has only 6 blocks"),
    (["--strategy", "ist", "--ist-update-fraction", "0"], "ist.update_fraction: 0.0 is not a fraction in (0, 1]"),
    (["--strategy", "ist", "--ist-suppress-fraction", "1.5"], "ist.suppress_fraction: 1.5 is not a fraction in "
                                                              "(0, 1]"),
    (["--strategy", "ist", "--select", "top:0.5"], "select: 'top:0.5' applies to strategy selection only"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_strategy_input_is_one_line_exit_2_and_leaves_nothing(deep, data_file, tmp_path, capsys, args,
                                                                     message):
    out = tmp_path / "run"
    code = main(["train", "--model", str(deep["llama6"]), "--data", str(data_file), "--out", str(out),
                 "--max-steps", "1", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("ila: error") == 1 and message in err.splitlines()[-1], err
    assert not out.exists() or not any(out.iterdir())


def test_lisa_ranking_for_another_model_is_refused(deep, data_file, tmp_path, capsys):
    layers = discover_layers(LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 4})))
    path = Ranking.from_scores(layers, range(len(layers))).save(tmp_path / "r.json")
    code = main(["train", "--model", str(deep["llama6"]), "--data", str(data_file), "--out", str(tmp_path / "run"),
                 "--method", "full", "--strategy", "lisa", "--lisa-sampling", "ranking", "--ranking", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "ranks 4 blocks but the model has 6" in err.splitlines()[-1]
    assert not (tmp_path / "run" / "run.json").exists()


def test_experiment_grid_takes_strategies_with_their_own_method(tmp_path):
    from ila.experiment import cells, load_grid

    path = tmp_path / "grid.yaml"
    path.write_text("methods: [lora]\nselections:\n  - all\n"
                    "  - {label: L, strategy: lisa, method: full, lisa: {layers: 2}, train: {learning_rate: 0.001}}\n"
                    "  - {label: M, strategy: midblock, midblock: {segments: '010'}}\n")
    grid = load_grid(path)
    assert [(m, s.label) for m, s in cells(grid)] == [("lora", "all"), ("lora", "M"), ("full", "L")]
    path.write_text("methods: [lora]\nselections:\n  - {label: L, strategy: lisa, lisa: {layers: 2}}\n")
    with pytest.raises(IlaError, match="method: strategy lisa trains with full, not 'lora'"):
        load_grid(path)


def test_cells_finished_before_new_config_keys_are_reused(tmp_path):
    """A run.json written before `strategy` and `gradient_checkpointing` existed holds their defaults."""
    import dataclasses

    from ila.config import to_dict
    from ila.experiment import _check_cell

    config = load_config(None, {"max_steps": 3}, TrainConfig)
    old = {k: v for k, v in to_dict(config).items() if k not in ("strategy", "gradient_checkpointing")}
    (tmp_path / "run.json").write_text(json.dumps({"config": old, "cost": {}}))
    _check_cell(tmp_path, config)  # reused
    with pytest.raises(IlaError, match="another gradient_checkpointing"):
        _check_cell(tmp_path, dataclasses.replace(config, gradient_checkpointing=True))


def test_a_selections_train_keys_cannot_change_its_cell(tmp_path):
    from ila.experiment import load_grid

    path = tmp_path / "grid.yaml"
    path.write_text("selections:\n  - {label: A, select: all, train: {method: full}}\n")
    with pytest.raises(IlaError, match="selections\\[0\\].train: 'method' is set by the grid or the selection"):
        load_grid(path)


# -- data parallel ------------------------------------------------------------------------------------------------


def test_every_strategy_trains_with_two_processes(deep, data_file, tmp_path):
    """`torchrun --nproc_per_node 2` on CPU (gloo): selection, LISA (with gradient checkpointing), IST and
    Mid-Block train without unused-parameter errors, and both processes end with the same weights."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(__file__).parent / "ddp_strategies.py"
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script),
                             str(deep["llama6"]), str(data_file), str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("selection", "lisa", "ist", "midblock"):
        assert reports[0][name]["world_size"] == reports[1][name]["world_size"] == 2
        assert reports[0][name]["checksum"] == reports[1][name]["checksum"]
        assert (tmp_path / name / "run.json").exists()
    assert (tmp_path / "ist" / "ranking.json").exists()
