"""`ila train`: each selection trains exactly the layers it claims, with LoRA, full fine-tuning, QLoRA, AdaLoRA."""

import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import make_model

from ila.config import TrainConfig
from ila.errors import IlaError
from ila.layers import discover_layers
from ila.ranking import Ranking
from ila.selection import select_layers
from ila.training.finetune import run_train

STRATEGIES = ["all", "freeze-bottom:0.25", "top:0.3", "random:0.25", "first:0.25", "last:0.25", "names:mlp",
              "intersect:0.5"]


def write_ranking(path, arch, seed):
    layers = discover_layers(make_model(arch))
    rng = random.Random(seed)
    return Ranking.from_scores(layers, [rng.gauss(0, 1) for _ in layers]).save(path)


@pytest.fixture(scope="module")
def rankings(tmp_path_factory):
    root = tmp_path_factory.mktemp("rankings")
    return [str(write_ranking(root / f"r{i}.json", "llama", i)) for i in range(2)]


def config(model_dir, data_file, method, select, rankings, **extra):
    c = TrainConfig(model=str(model_dir), data=str(data_file), method=method, select=select, max_steps=3,
                    batch_size=4, max_length=32, save_steps=100)
    c.rankings = rankings[:2] if select.startswith("intersect") else rankings[:1] if ":" in select else []
    if select.startswith(("random", "first", "last", "names")):
        c.rankings = []
    c.lora.r = 4
    for k, v in extra.items():
        setattr(c, k, v)
    return c


def names_with_optimizer_state(run, layers):
    params = {id(p): n for n, p in run.model.named_parameters()}
    touched = {params[id(p)] for group in run.trainer.optimizer.param_groups for p in group["params"]
               if p in run.trainer.optimizer.state}
    return {x.name for x in layers if any(f"{x.name}." in n for n in touched)}


def other_params(model, layers):
    """Parameter names outside the blocks' linear layers: embeddings, norms, LM head."""
    return {n for n, _ in model.named_parameters() if not any(n.startswith(f"{x.name}.") for x in layers)}


def moved_other_params(before, after, layers):
    now = dict(after.named_parameters())
    return {n for n, p in before.named_parameters() if n in other_params(before, layers) and not torch.equal(p, now[n])}


@pytest.mark.parametrize("train_other", [True, False])
def test_full_train_other_overrides_the_default(train_other, model_dirs, data_file, rankings, tmp_path):
    before = make_model("llama")
    layers = discover_layers(before)
    select = "top:0.3" if train_other else "all"  # the opposite of each selection's default
    run = run_train(config(model_dirs("llama"), data_file, "full", select, rankings, train_other=train_other),
                    tmp_path / "run")
    assert moved_other_params(before, run.model, layers) == (other_params(before, layers) if train_other else set())
    trained = {x.name for x in run.selection.trained}
    assert names_with_optimizer_state(run, layers) == trained


@pytest.mark.parametrize("select", STRATEGIES)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_selection_trains_exactly_its_layers(method, select, model_dirs, data_file, rankings, tmp_path):
    model_dir = model_dirs("llama")
    before = make_model("llama")  # identical to the saved model (same seed)
    layers = discover_layers(before)
    loaded = [Ranking.load(r) for r in config(model_dir, data_file, method, select, rankings).rankings]
    expected = {x.name for x in select_layers(select, layers, loaded, seed=0).trained}

    run = run_train(config(model_dir, data_file, method, select, rankings), tmp_path / "run")
    assert {x.name for x in run.selection.trained} == expected
    assert names_with_optimizer_state(run, layers) == expected
    summary = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert set(summary["trained"]) == expected and summary["trained_count"] == len(expected)
    assert summary["trained_fraction"] == pytest.approx(len(expected) / len(layers))
    cost = json.loads((tmp_path / "run" / "run.json").read_text())["cost"]
    for key in ("trainable_params", "trained_layer_fraction", "peak_memory_mb", "median_step_ms", "tokens_per_s"):
        assert cost[key] > 0, key
    if method == "full":
        base = run.model
        for layer in layers:
            same = torch.equal(base.get_submodule(layer.name).weight, before.get_submodule(layer.name).weight)
            assert same == (layer.name not in expected), layer.name  # frozen: bit-identical; trained: moved
        # embeddings, norms and the LM head train unless the selection names what trains (train_other unset)
        train_only = select.startswith(("top:", "names:"))
        assert moved_other_params(before, run.model, layers) == (set() if train_only else other_params(before, layers))
        assert cost["other_params_trained"] == (not train_only)
        assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    else:
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_strategies_pick_the_documented_layers(rankings):
    layers = discover_layers(make_model("llama"))  # 14 layers
    r = Ranking.load(rankings[0])
    assert {x.name for x in layers} - {x.name for x in select_layers("freeze-bottom:0.25", layers, [r]).trained} \
        == {x.name for x in r.bottom(0.25)}
    assert select_layers("first:0.25", layers).trained == layers[4:]  # ⌈0.25·14⌉ = 4 frozen
    assert select_layers("last:0.25", layers).trained == layers[:10]
    assert select_layers("random:0.25", layers, seed=1).trained == select_layers("random:0.25", layers, seed=1).trained
    assert select_layers("random:0.25", layers, seed=1).trained != select_layers("random:0.25", layers, seed=2).trained
    assert all("mlp" in x.name for x in select_layers("names:mlp", layers).trained)
    r2 = Ranking.load(rankings[1])
    frozen = {x.name for x in r.bottom(0.5)} & {x.name for x in r2.bottom(0.5)}
    assert {x.name for x in select_layers("intersect:0.5", layers, [r, r2]).trained} == \
        {x.name for x in layers} - frozen


def _deeper_ranking(blocks: int) -> Ranking:
    from conftest import SMALL
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**SMALL, "num_hidden_layers": blocks}, head_dim=8, sliding_window=16))
    layers = discover_layers(model)
    return _renamed(Ranking.from_scores(layers, [float(i) for i in range(len(layers))]))


def test_transfer_across_depths():
    target = discover_layers(make_model("llama"))  # 2 blocks
    four = _deeper_ranking(4)
    selection = select_layers("all", target, [four], transfer=True)
    assert selection.mapping["model.layers.0.mlp.up_proj"] == "m.blocks.0.mlp.up_proj"
    assert selection.mapping["model.layers.1.mlp.up_proj"] == "m.blocks.3.mlp.up_proj"  # relative depth 1 -> 1
    with pytest.raises(IlaError, match="ranks 4 blocks but the model has 2"):
        select_layers("top:0.5", target, [four])


def test_data_seed_fixes_the_split_across_training_seeds(model_dirs, data_file, tmp_path):
    def train_split(seed, data_seed):
        c = config(model_dirs("llama"), data_file, "lora", "all", [], seed=seed, data_seed=data_seed, max_steps=1)
        c.heldout_fraction = 0.3
        run = run_train(c, tmp_path / f"run-{seed}-{data_seed}")
        return sorted(map(tuple, run.trainer.train_dataset["input_ids"]))

    assert train_split(0, 3) == train_split(1, 3)
    assert train_split(0, None) != train_split(1, None)


def test_random_freezes_exactly_the_fraction():
    layers = discover_layers(make_model("llama"))
    for fraction, frozen in ((0.25, 4), (0.5, 7), (0.1, 2)):
        assert len(layers) - len(select_layers(f"random:{fraction}", layers, seed=3).trained) == frozen


def test_adalora_penalty_is_peft_own(model_dirs):
    from peft import AdaLoraConfig, get_peft_model

    from ila.training.loss import response_loss
    from ila.training.methods import adalora_orthogonality

    model = get_peft_model(make_model("llama"), AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                             target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(8, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        peft_loss = model.base_model(**batch).loss  # AdaLoraModel adds its term when it computes the loss
        ours = response_loss(model, batch) + adalora_orthogonality(model)
    torch.testing.assert_close(ours, peft_loss)
    assert adalora_orthogonality(model) > 0


def test_resume_guards(model_dirs, data_file, tmp_path, capsys):
    from ila.cli import main

    common = ["train", "--model", str(model_dirs("llama")), "--data", str(data_file), "--max-steps", "2",
              "--max-length", "32"]
    assert main([*common, "--out", str(tmp_path / "done")]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "done"), "--resume"]) == 2  # finished: nothing to resume
    assert "already holds a finished run" in capsys.readouterr().err
    (tmp_path / "half" / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    assert main([*common, "--out", str(tmp_path / "half")]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "ada"), "--method", "adalora", "--resume"]) == 2
    assert "not supported for method adalora" in capsys.readouterr().err


def test_cross_model_transfer_maps_by_depth_and_role(tmp_path):
    source = Ranking.load(write_ranking(tmp_path / "gemma.json", "gemma3", 0))  # 2 blocks, Llama-style roles
    target = discover_layers(make_model("llama"))
    with pytest.raises(IlaError, match="--transfer"):
        select_layers("top:0.5", target, [_renamed(source)])
    selection = select_layers("top:0.5", target, [_renamed(source)], transfer=True)
    assert selection.mapping["model.layers.1.mlp.down_proj"] == "m.blocks.1.mlp.down_proj"
    assert len(selection.trained) == 7


def _renamed(ranking):
    from ila.layers import LayerId
    from ila.ranking import LayerScore

    entries = [LayerScore(LayerId(e.layer.name.replace("model.layers", "m.blocks"), e.layer.block, e.layer.role),
                          e.score) for e in ranking.entries]
    return Ranking(entries, {"source": "ranking other.json"})


def test_qlora_trains_a_few_steps(data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from conftest import SMALL, make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    # bitsandbytes quantises in blocks of 64 values: the layers need dimensions of at least that
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**SMALL, "hidden_size": 128, "intermediate_size": 256}))
    base.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    run = run_train(_qlora_config(tmp_path / "m", data_file), tmp_path / "q")
    assert run.trainer.state.global_step == 3
    assert any("Linear4bit" in type(m).__name__ for m in run.model.modules())
    cost = json.loads((tmp_path / "q" / "run.json").read_text())["cost"]
    # the base's parameters at their real shape (not 4-bit storage) plus the adapter's
    assert cost["total_params"] == sum(p.numel() for p in base.parameters()) + cost["trainable_params"]
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()


def _qlora_config(model_dir, data_file):
    c = TrainConfig(model=str(model_dir), data=str(data_file), method="qlora", select="names:mlp", max_steps=3,
                    batch_size=4, max_length=32, save_steps=100)
    c.lora.r = 4
    return c


def test_adalora_reallocates_ranks(model_dirs, data_file, tmp_path):
    c = TrainConfig(model=str(model_dirs("llama")), data=str(data_file), method="adalora", select="all",
                    max_steps=20, batch_size=4, max_length=32, save_steps=100, learning_rate=1e-2)
    c.adalora.init_r, c.adalora.target_r, c.adalora.tinit, c.adalora.tfinal, c.adalora.delta_t = 6, 2, 0.1, 0.3, 2
    run = run_train(c, tmp_path / "a")
    pattern = run.model.peft_config["default"].rank_pattern
    assert pattern, "AdaLoRA never fixed a rank pattern"
    kept = sum(sum(bool(v) for v in mask) for mask in pattern.values())
    assert kept < 6 * 14  # the budget took ranks away from the initial 6 per layer


def test_qlora_without_bitsandbytes_names_the_extra(model_dirs, data_file, tmp_path):
    # sys.modules[name] = None makes both `import` and importlib's find_spec see the package as absent
    code = "import sys; sys.modules['bitsandbytes'] = None; from ila.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "train", "--model", str(model_dirs("llama")), "--data",
                           str(data_file), "--out", str(tmp_path / "x"), "--method", "qlora"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "ila: error: method qlora needs bitsandbytes: pip install 'ila[qlora]' (or: pip install bitsandbytes)")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, needle", [
    (["--select", "top:1.5"], "not in (0, 1]"),
    (["--select", "bogus:0.2"], "unknown strategy 'bogus'"),
    (["--method", "dora"], "method: 'dora'"),
    (["--select", "top:0.3"], "needs exactly one --ranking"),
    (["--train-other"], "train_other: applies to method full only, not 'lora'"),
])
def test_train_bad_input(args, needle, model_dirs, data_file, tmp_path, capsys):
    from ila.cli import main

    code = main(["train", "--model", str(model_dirs("llama")), "--data", str(data_file), "--out",
                 str(tmp_path / "o"), "--max-steps", "2", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err.strip().splitlines()[-1], err
    assert not (tmp_path / "o" / "run.json").exists()


def test_ranking_from_another_model_is_refused(model_dirs, data_file, tmp_path, capsys):
    from ila.cli import main

    other = write_ranking(tmp_path / "gpt2.json", "gpt2", 0)
    code = main(["train", "--model", str(model_dirs("llama")), "--data", str(data_file), "--out",
                 str(tmp_path / "o"), "--select", "top:0.3", "--ranking", str(other)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "gpt2.json" in err and "--transfer" in err


@pytest.mark.parametrize("save_steps", [0, 2])
def test_save_steps_zero_writes_no_checkpoints(save_steps, model_dirs, data_file, tmp_path, capsys):
    from ila.cli import main

    args = ["train", "--model", str(model_dirs("llama")), "--data", str(data_file), "--max-steps", "3",
            "--batch-size", "4", "--max-length", "32", "--save-steps", str(save_steps), "--out", str(tmp_path / "run")]
    assert main(args) == 0
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ([] if save_steps == 0 else ["checkpoint-2", "checkpoint-3"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["save_steps"] == save_steps
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "bad"), "--save-steps", "-1"]) == 2
    err = capsys.readouterr().err
    assert "save_steps" in err and ">= 0" in err and "Traceback" not in err


def test_resume_without_a_checkpoint_says_it_starts_over(model_dirs, data_file, rankings, tmp_path, caplog):
    c = config(model_dirs("llama"), data_file, "lora", "all", rankings, save_steps=0)
    with caplog.at_level("WARNING", logger="ila.training.trainer"):
        run = run_train(c, tmp_path / "run", resume=True)
    assert run.trainer.state.global_step == 3
    assert any("no complete checkpoint" in r.getMessage() and "step 0" in r.getMessage() for r in caplog.records)
