"""`ila analyze` on tiny saved models: known answers (a model against itself, a copy with one block changed, the
logit lens at the last layer), the run folder, and one-line errors for bad input."""

import csv
import json
import math

import pytest
import torch
from conftest import SMALL, make_tokenizer
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import ila
from ila.cli import main
from ila.data import build_dataset, collate, load_examples
from ila.evaluation.heldout import heldout_loss
from ila.layers import discover_layers
from ila.ranking import Ranking

FAST = {"max_examples": 12, "max_length": 32, "batch_size": 4, "segments": 3}


def llama(depth: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": depth}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    base = llama()
    changed = llama()
    with torch.no_grad():  # only block 2 differs
        for p in changed.model.layers[2].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    other = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 4, "intermediate_size": 48}))
    out = {}
    for name, model in (("base", base), ("changed", changed), ("other", other)):
        model.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
        out[name] = root / name
    adapter = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(root / "adapter")
    out["adapter"] = root / "adapter"
    other_adapter = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    other_adapter.save_pretrained(root / "other_adapter")
    out["other_adapter"] = root / "other_adapter"
    return out


def by(rows, metric):
    return {r["layer"]: r for r in rows if r["metric"] == metric}


def test_a_model_against_itself(folders, data_file, tmp_path):
    rows = ila.analyze(tmp_path / "a", base=str(folders["base"]), tuned=str(folders["base"]), data=str(data_file),
                       **FAST)
    assert set(by(rows, "cka")) == set(range(5))  # hidden states 0 (embeddings) .. 4 (last block's output)
    for layer in range(5):
        assert by(rows, "cka")[layer]["value"] == pytest.approx(1.0, abs=1e-9)
        assert by(rows, "cosine")[layer]["value"] == pytest.approx(1.0, abs=1e-9)
        assert by(rows, "mean_shift")[layer]["value"] == pytest.approx(0.0, abs=1e-9)
        assert by(rows, "prompt_entropy")[layer]["value"] == pytest.approx(0.0, abs=1e-12)
    assert [r["value"] for r in by(rows, "weight_change").values()] == [0.0] * 4
    model, tokenizer = ila.load_model(str(folders["base"]))
    dataset = build_dataset(load_examples(str(data_file), max_examples=12), tokenizer, max_length=32)
    own = heldout_loss(model, dataset, collate(tokenizer), batch_size=4)["perplexity"]
    swaps = by(rows, "swap_ppl")
    assert len(swaps) == 3
    for r in swaps.values():
        assert r["base"] == pytest.approx(own, rel=1e-6) and r["tuned"] == pytest.approx(own, rel=1e-6)
    # the last layer's logit lens is the model's own next-token prediction
    assert math.log(by(rows, "logit_lens_ppl")[4]["base"]) == pytest.approx(math.log(own), rel=1e-6)


def test_only_block_k_changed(folders, data_file, tmp_path):
    rows = ila.analyze(tmp_path / "a", base=str(folders["base"]), tuned=str(folders["changed"]),
                       data=str(data_file), **FAST)
    change = by(rows, "weight_change")
    assert [layer for layer, r in change.items() if r["value"] > 0] == [3]  # block 2 writes hidden state 3
    assert by(rows, "weight_change_all")[3]["value"] > change[3]["value"] > 0
    cka = by(rows, "cka")
    for layer in range(3):  # hidden states 0..2 come before block 2
        assert cka[layer]["value"] == pytest.approx(1.0, abs=1e-9)
        assert by(rows, "mean_shift")[layer]["value"] == pytest.approx(0.0, abs=1e-9)
    assert cka[3]["value"] < 1 - 1e-6 and by(rows, "cosine")[3]["value"] < 1 - 1e-6


def test_logit_lens_last_layer_equals_the_models_own_accuracy(folders, data_file, tmp_path):
    rows = ila.analyze(tmp_path / "a", base=str(folders["base"]), tuned=str(folders["changed"]),
                       data=str(data_file), swap=False, **FAST)
    model, tokenizer = ila.load_model(str(folders["changed"]))
    dataset = build_dataset(load_examples(str(data_file), max_examples=12), tokenizer, max_length=32)
    batch = collate(tokenizer)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    accuracy = float((logits.argmax(-1)[scored] == targets[scored]).float().mean())
    assert by(rows, "logit_lens_acc")[4]["tuned"] == pytest.approx(accuracy)
    assert "swap_ppl" not in {r["metric"] for r in rows}


def test_run_folder_files_and_ranking_correlation(folders, data_file, tmp_path):
    layers = discover_layers(llama())
    ranking = Ranking.from_scores(layers, [float(x.block) for x in layers]).save(tmp_path / "r.json")
    out = tmp_path / "a"
    code = main(["analyze", "--base", str(folders["base"]), "--tuned", str(folders["adapter"]), "--data",
                 str(data_file), "--out", str(out), "--ranking", str(ranking), "--max-examples", "8",
                 "--max-length", "32", "--segments", "2"])
    assert code == 0
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["metric", "layer", "mode", "base", "tuned", "value"]
    assert {r["mode"] for r in table} == {"sample", "dataset", "alignment", "weights", "probe", "swap"}
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["rows"]) == len(table) and saved["blocks"] == 4
    with open(out / "correlation.csv") as f:
        correlations = {r["metric"]: float(r["spearman"]) for r in csv.DictReader(f)}
    assert "weight_change" in correlations and all(-1 <= v <= 1 for v in correlations.values())
    for name in ("alignment", "entropy", "rank", "geometry", "probe", "weights", "swap", "metric_correlation"):
        assert (out / f"{name}.png").stat().st_size > 1000


BAD = [
    ({"tuned": "other"}, "architecture differs from the base model (intermediate_size: 64 vs 48)"),
    ({"tuned": "other_adapter"}, "does not match the model"),
    ({"tuned": "run_without_weights"}, "holds no weights (expected model/ or adapter/)"),
    ({"data": "missing.jsonl"}, "missing.jsonl"),
    ({"segments": "1"}, "segments: 1 must be at least 2"),
    ({"segments": "9"}, "segments: 9 must be between 2 and the model's 4 blocks"),
    ({"ranking": "other_ranking"}, "ranks 6 blocks but the model has 4"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_one_line_exit_2_and_leaves_no_metrics(folders, data_file, tmp_path, capsys, change, message):
    (tmp_path / "run_without_weights").mkdir()
    (tmp_path / "run_without_weights" / "run.json").write_text("{}")
    layers = discover_layers(llama(depth=6))
    Ranking.from_scores(layers, range(len(layers))).save(tmp_path / "other_ranking")
    args = {"base": str(folders["base"]), "tuned": str(folders["changed"]), "data": str(data_file), "segments": "2"}
    for key, value in change.items():
        args[key] = str(folders[value]) if value in folders else str(tmp_path / value) if key != "segments" else value
    argv = ["analyze", "--out", str(tmp_path / "out"), "--max-examples", "8", "--max-length", "32"]
    for key, value in args.items():
        argv += [f"--{key}", value]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("ila: error") == 1 and message in err.splitlines()[-1], err
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_the_shipped_worked_example_config_loads():
    from pathlib import Path

    from ila.config import AnalyzeConfig, load_config

    config = load_config(Path(__file__).parent.parent / "configs" / "analyze_smollm2.yaml", {}, AnalyzeConfig)
    assert config.base == "smollm2-135m" and config.tuned == "runs/tuned_smollm2" and config.segments == 5


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "olmo2"])
def test_other_architectures_against_themselves(model_dirs, data_file, tmp_path, arch):
    """The final norm and the blocks are found in each layout: the last layer's logit lens is the model's own."""
    folder = str(model_dirs(arch))
    rows = ila.analyze(tmp_path / "a", base=folder, tuned=folder, data=str(data_file), **{**FAST, "segments": 2})
    assert all(r["value"] == pytest.approx(1.0, abs=1e-9) for r in rows if r["metric"] == "cka")
    lens = by(rows, "logit_lens_ppl")
    swaps = by(rows, "swap_ppl")
    assert lens[max(lens)]["base"] == pytest.approx(swaps[0]["base"], rel=1e-6)  # both: the model's own perplexity
