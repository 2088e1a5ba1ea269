"""weight-norm, snr, block-influence and shapley with known answers; `--method all`; `ila compare --out`."""

import csv
import itertools
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL, make_tokenizer
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
)

from ila.cli import main
from ila.config import load_config
from ila.data import collate, load_data
from ila.importance.base import Inputs, method_names, methods
from ila.importance.stage1 import Update, run_stage1
from ila.layers import base_model_of, discover_layers
from ila.ranking import Ranking

DEEP = {**SMALL, "num_hidden_layers": 4}
DEEP_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DEEP)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**DEEP, head_dim=8, sliding_window=16)),
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**DEEP)),
}
FAST = ["--max-steps", "4", "--stage2-steps", "3", "--max-length", "32"]


def deep_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return DEEP_MODELS[arch]().eval()


@pytest.fixture(scope="module")
def toy(data_file, tokenizer):
    train, _ = load_data(str(data_file), tokenizer, max_length=32, heldout_fraction=0.0, seed=0)
    return train, collate(tokenizer)


def _inputs(method, layers, overrides=None, **kw):
    config = load_config(None, {"method": method, **(overrides or {})})
    return Inputs(config=config, options=config.options(), layers=layers, **kw)


def _loss(model, batch) -> float:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return float(F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100))


# -- weight-norm ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("update", ["lora", "full"])
def test_weight_norm_is_the_mean_over_steps_of_each_layers_trained_weight_norm(update, toy, tmp_path):
    """The tracked norm after each step equals one computed by hand from the layer (β·B·A or W), and the
    score is the mean over the steps (seeds/002, LISA)."""
    from transformers import TrainerCallback

    from ila.importance.weight_norm import score, track

    train, collator = toy
    model = deep_model("llama")
    layers = discover_layers(model)

    class ByHand(TrainerCallback):
        def __init__(self, model, layers):
            self.rows, self.modules = [], [base_model_of(model).get_submodule(x.name) for x in layers]

        def on_step_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                self.rows.append([float(torch.linalg.matrix_norm(m.get_delta_weight("default") if update == "lora"
                                                                 else m.weight)) for m in self.modules])

    config = load_config(None, {"stage1.update": update, "stage1.max_steps": 5, "stage1.epsilon": 1e-9,
                                "stage1.learning_rate": 1e-2, "lora.dropout": 0.0})
    s1 = run_stage1(model, layers, train, collator, config, tmp_path,
                    trackers={"weight-norm": track, "hand": ByHand})
    rows = s1.tracked["hand"].rows
    tracked = s1.tracked["weight-norm"].norms
    assert len(rows) == len(tracked) == 5
    assert [v for row in tracked for v in row] == pytest.approx([v for row in rows for v in row], rel=1e-5)
    scored = score(_inputs("weight-norm", layers, update=Update(s1.model, layers, s1.initial),
                           tracked=s1.tracked["weight-norm"]))
    assert scored.scores == pytest.approx([sum(r[i] for r in rows) / 5 for i in range(len(layers))], rel=1e-5)
    assert scored.metadata["tracked_steps"] == 5


def test_weight_norm_keeps_the_steps_before_a_resumed_checkpoint(toy, tmp_path):
    import shutil

    from ila.importance.weight_norm import track

    train, collator = toy
    layers = discover_layers(deep_model("llama"))
    config = load_config(None, {"stage1.max_steps": 4, "stage1.save_steps": 2, "stage1.epsilon": 1e-9,
                                "stage1.learning_rate": 1e-2, "lora.dropout": 0.0})
    whole = run_stage1(deep_model("llama"), layers, train, collator, config, tmp_path / "a",
                       trackers={"weight-norm": track}).tracked["weight-norm"].norms
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")  # interrupted after step 2
    resumed = run_stage1(deep_model("llama"), layers, train, collator, config, tmp_path / "b", resume=True,
                         trackers={"weight-norm": track}).tracked["weight-norm"].norms
    assert len(resumed) == 4 and resumed[:2] == whole[:2]  # read back from the checkpoint
    assert [v for r in resumed for v in r] == pytest.approx([v for r in whole for v in r], rel=1e-4)


# -- snr -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64), (96, 160), (256, 128)])
def test_snr_scores_pure_noise_below_low_rank_plus_noise(shape):
    """Spectrum's SNR: a weight with a few strong directions over weak noise (2 % of the norm) beats pure noise
    of the same shape and Frobenius norm. (With more noise it need not: docs/importance-methods.md.)"""
    from ila.importance.snr import weight_snr

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(*shape, generator=g)
    low_rank = torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g)
    structured = low_rank / low_rank.norm() + 0.02 * noise / noise.norm()
    structured, noise = structured / structured.norm(), noise / noise.norm()
    assert weight_snr(noise) < weight_snr(structured)


def test_snr_reads_the_safetensors_weights_and_ranks_within_each_role(tmp_path, capsys):
    from ila.importance.snr import weight_snr

    folder = tmp_path / "model"
    model = deep_model("llama")
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    out = tmp_path / "snr"
    assert main(["identify", "--method", "snr", "--model", str(folder), "--out", str(out)]) == 0
    ranking = Ranking.load(out / "ranking.json")
    meta = ranking.metadata
    assert meta["method"] == "snr" and meta["data"] is None and meta["snr_ranked_within_role"] is True
    layers = discover_layers(model)
    by_hand = [weight_snr(base_model_of(model).get_submodule(x.name).weight.detach()) for x in layers]
    assert meta["snr"] == pytest.approx(by_hand, rel=1e-5)
    # within each role, the order is the raw SNR's, and a top quarter holds a quarter of every role
    for role in {x.role for x in layers}:
        mine = [e for e in ranking.entries if e.layer.role == role]
        raw = {x.name: v for x, v in zip(layers, by_hand, strict=True)}
        assert sorted(mine, key=lambda e: e.score) == sorted(mine, key=lambda e: raw[e.layer.name])
    top = ranking.top(0.25)
    assert {x.role for x in top} == {x.role for x in layers} and len(top) == len(layers) // 4


def test_snr_on_a_folder_without_safetensors_says_how_to_convert(tmp_path, capsys):
    folder = tmp_path / "bin_model"
    model = deep_model("llama")
    model.config.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    out = tmp_path / "snr"
    assert main(["identify", "--method", "snr", "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no safetensors weights (found pytorch_model.bin)" in err
    assert "safe_serialization=True" in err and not (out / "ranking.json").exists()


# -- block-influence -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(DEEP_MODELS))
@pytest.mark.parametrize("distance", ["cosine", "angular"])
def test_block_influence_gives_an_identity_block_the_lowest_score(arch, distance, toy):
    from ila.importance.block_influence import score

    train, collator = toy
    model = deep_model(arch)
    blocks = base_model_of(model).model.layers
    with torch.no_grad():  # block 1 adds nothing to the residual stream: its output projections are zero
        blocks[1].self_attn.o_proj.weight.zero_()
        blocks[1].mlp.down_proj.weight.zero_()
    layers = discover_layers(model)
    scored = score(_inputs("block-influence", layers, {"block-influence.distance": distance}, model=model,
                           train=train, collator=collator))
    per_block = scored.metadata["block_scores"]
    assert per_block[1] == pytest.approx(0.0, abs=1e-6) and min(per_block[i] for i in (0, 2, 3)) > 1e-3
    assert all(s == per_block[x.block] for s, x in zip(scored.scores, layers, strict=True))
    # the other blocks: 1 − mean cos between consecutive hidden states, by hand
    data = train.shuffle(seed=0).select(range(64))
    sums, count = torch.zeros(4, dtype=torch.float64), 0
    for start in range(0, 64, 4):
        batch = collator([data[i] for i in range(start, start + 4)])
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].bool()
        count += int(mask.sum())
        for b in range(3):  # the last entry of hidden_states is after the final norm
            cos = F.cosine_similarity(hidden[b].double(), hidden[b + 1].double(), dim=-1).clamp(-1, 1)
            d = 1 - cos if distance == "cosine" else torch.arccos(cos) / torch.pi
            sums[b] += d[mask].sum()
    assert per_block[:3] == pytest.approx((sums[:3] / count).tolist(), rel=1e-4, abs=1e-6)


# -- shapley -------------------------------------------------------------------------------------------------

def _subset_losses(model, update, players, batch):
    """Loss of θ₀ + Σ_{i∈S} ΔWᵢ for every subset S of players, on a plain copy of the base weights."""
    import copy

    deltas = {x.name: update.delta(x) for x in update.layers}
    losses = {}
    for size in range(len(players) + 1):
        for subset in itertools.combinations(range(len(players)), size):
            trial = copy.deepcopy(model)
            with torch.no_grad():
                for p in subset:
                    for i in players[p]:
                        name = update.layers[i].name
                        trial.get_submodule(name).weight.add_(deltas[name])
            losses[frozenset(subset)] = _loss(trial.eval(), batch)
    return losses


@pytest.mark.parametrize("level, roles", [("layer", ["q_proj"]), ("block", None)])
def test_shapley_with_two_players_recovers_the_exact_values(level, roles, toy, tmp_path):
    """Two players (two layers' updates, or two blocks'): φ₁ = ½[(v₁ − v∅) + (v₁₂ − v₂)], v(S) the loss removed."""
    from ila.importance.shapley import score

    train, collator = toy
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()  # two blocks
    plain = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    plain.load_state_dict(model.state_dict())
    layers = discover_layers(model, roles)
    config = load_config(None, {"lora.dropout": 0.0, "stage1.max_steps": 8, "stage1.learning_rate": 2e-2,
                                "stage1.epsilon": 1e-9, **({"lora.target_roles": roles} if roles else {})})
    s1 = run_stage1(model, layers, train, collator, config, tmp_path)
    update = Update(s1.model, layers)
    players = [[0], [1]] if level == "layer" else [[i for i, x in enumerate(layers) if x.block == b] for b in (0, 1)]
    data = train.shuffle(seed=0).select(range(16))
    v = _subset_losses(plain, update, players, collator([data[i] for i in range(16)]))
    exact = [0.5 * ((v[frozenset()] - v[frozenset({i})]) + (v[frozenset({1 - i})] - v[frozenset({0, 1})]))
             for i in (0, 1)]
    inputs = _inputs("shapley", layers, {"shapley.level": level, "shapley.examples": 16,
                                         "shapley.batch_size": 16}, update=update, train=train, collator=collator)
    scored = score(inputs)
    assert scored.metadata["exact"] is True and scored.metadata["evaluations"] == 4  # all coalitions
    assert scored.metadata["shapley_values"] == pytest.approx(exact, rel=1e-4, abs=1e-6)
    assert scored.metadata["standard_errors"] == [0.0, 0.0]
    for player, indices in enumerate(players):  # every layer of a player carries the player's value
        assert all(scored.scores[i] == scored.metadata["shapley_values"][player] for i in indices)
    # efficiency: the values add up to the loss the whole update removes
    assert sum(exact) == pytest.approx(v[frozenset()] - v[frozenset({0, 1})], rel=1e-6)


def test_monte_carlo_shapley_keeps_to_the_budget_and_reports_standard_errors():
    from ila.importance.shapley import permutation_shapley

    weights = [0.5, 1.0, 2.0, 4.0, 0.25, 3.0, 1.5, 0.75]  # v(S) = Σ w + an interaction between players 0 and 1
    calls = []

    def value(s):
        calls.append(s)
        return sum(weights[i] for i in s) + (1.0 if {0, 1} <= s else 0.0)

    values, errors, meta = permutation_shapley(value, 8, budget=60, seed=0)
    assert not meta["exact"] and meta["permutations"] >= 2 and meta["evaluations"] <= 60
    assert len(calls) == len(set(calls)) == meta["evaluations"]  # each coalition evaluated once
    assert sum(values) == pytest.approx(value(frozenset(range(8))))  # every permutation's marginals sum to v(N)
    assert values[2:] == pytest.approx(weights[2:])  # additive players: exact from any permutation
    assert errors[2:] == pytest.approx([0.0] * 6, abs=1e-12) and errors[0] > 0 and errors[1] > 0
    assert values == permutation_shapley(value, 8, budget=60, seed=0)[0]  # the seed fixes the permutations


@pytest.mark.parametrize("n, budget", [(6, 320), (4, 18), (3, 8)])
def test_shapley_is_exact_from_all_coalitions_when_they_fit_the_budget(n, budget):
    """2ⁿ ≤ budget: the values equal the average marginal over all n! orders (and the call returns: a budget
    between 2ⁿ and n! must not make it sample forever)."""
    from ila.importance.shapley import permutation_shapley

    g = torch.Generator().manual_seed(n)
    table = {frozenset(s): float(torch.randn(1, generator=g)) if s else 0.0
             for k in range(n + 1) for s in itertools.combinations(range(n), k)}
    values, errors, meta = permutation_shapley(table.__getitem__, n, budget=budget, seed=0)
    by_orders = [0.0] * n
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        for k, player in enumerate(order):
            by_orders[player] += (table[frozenset(order[:k + 1])] - table[frozenset(order[:k])]) / len(orders)
    assert meta["exact"] and meta["evaluations"] == 2 ** n and errors == [0.0] * n
    assert values == pytest.approx(by_orders, abs=1e-9)


def test_a_shapley_budget_too_small_for_one_permutation_is_refused_before_training(model_dirs, data_file, tmp_path,
                                                                                  capsys):
    out = tmp_path / "s"
    code = main(["identify", "--method", "shapley", "--shapley-level", "layer", "--shapley-budget", "10",
                 "--model", str(model_dirs("llama")), "--data", str(data_file), "--out", str(out), "--max-steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err == ("ila: error: shapley.budget: 10 loss evaluations cannot finish one permutation of "
                                 "14 layers (it needs 15); raise it or use --shapley-level block")
    assert not (out / "ranking.json").exists() and not (out / "adapter").exists()


# -- --method all, compare --out -----------------------------------------------------------------------------

def test_method_all_runs_every_method_on_one_shared_update_and_compares_them(model_dirs, data_file, tmp_path,
                                                                            capsys):
    out = tmp_path / "all"
    assert main(["identify", "--list-methods"]) == 0
    listed = capsys.readouterr().out
    names = sorted(methods())
    assert {"ila", "ila-fast", "update-norm", "weight-norm", "grad-norm", "snr", "block-influence",
            "shapley"} <= set(names)
    assert all(f"{n} " in listed for n in names)
    assert main(["identify", "--method", "all", "--model", str(model_dirs("qwen2")), "--data", str(data_file),
                 "--out", str(out), "--shapley-budget", "40", *FAST]) == 0
    printed = capsys.readouterr().out
    rankings = {n: Ranking.load(out / n / "ranking.json") for n in names}
    assert all(rankings[n].method == n and (out / n / "heatmap.png").is_file() for n in names)
    assert [e.layer for e in rankings["snr"].entries] == [e.layer for e in rankings["ila"].entries]
    # one stage 1, shared: one adapter, and every update method reports the same stage-1 run
    updates = [n for n in names if methods()[n].needs_update()]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not any((out / n / "adapter").exists() for n in names)
    assert len({rankings[n].metadata["timings"]["stage1_s"] for n in updates}) == 1
    assert all("stage1_s" not in rankings[n].metadata["timings"] for n in names if n not in updates)
    assert rankings["block-influence"].metadata["level"] == "block"
    # the comparison of all of them
    with open(out / "jaccard.csv") as f:
        table = list(csv.reader(f))
    order = method_names("all")  # the run order: methods on the base model, then those on the update
    assert sorted(order) == names and table[0][1:] == order and [row[0] for row in table[1:]] == order
    i, j = order.index("ila"), order.index("snr")
    assert float(table[1 + i][1 + j]) == pytest.approx(rankings["ila"].jaccard(rankings["snr"], 0.75), abs=1e-4)
    assert (out / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "comparison.json").read_text())["labels"] == order
    assert "spearman" in printed and "weight-norm" in printed
    # a finished run is not overwritten
    assert main(["identify", "--method", "all", "--model", str(model_dirs("qwen2")), "--data", str(data_file),
                 "--out", str(out)]) == 2


def test_method_all_resume_keeps_finished_methods_of_the_same_settings(model_dirs, data_file, tmp_path, capsys):
    out = tmp_path / "all"
    args = ["identify", "--method", "all", "--model", str(model_dirs("llama")), "--data", str(data_file),
            "--out", str(out), "--shapley-budget", "40", *FAST]
    assert main(args) == 0
    (out / "comparison.json").unlink()  # as if it stopped while scoring ila-fast
    shutil.rmtree(out / "ila-fast")
    kept = {p: p.stat().st_mtime_ns for p in out.glob("*/ranking.json")}
    assert main(args) == 2 and "unfinished --method all run" in capsys.readouterr().err
    assert main([*args, "--resume", "--seed", "1"]) == 2
    assert "was made with seed=0, not 1" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept and (out / "ila-fast" / "ranking.json").is_file()
    assert (out / "comparison.json").is_file() and (out / "blocks" / "jaccard.csv").is_file()


def test_method_all_with_an_adapter_refuses_methods_that_need_training(model_dirs, data_file, tmp_path, capsys):
    ila_run = tmp_path / "ila"
    assert main(["identify", "--model", str(model_dirs("llama")), "--data", str(data_file), "--out", str(ila_run),
                 *FAST]) == 0
    capsys.readouterr()
    out = tmp_path / "all"
    code = main(["identify", "--method", "all", "--adapter", str(ila_run / "adapter"), "--model",
                 str(model_dirs("llama")), "--data", str(data_file), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--method all includes 'weight-norm', which watches stage-1 training" in err
    assert not out.exists()


def test_compare_out_writes_the_matrices_as_csv_and_an_annotated_heatmap(tmp_path, capsys):
    layers = discover_layers(deep_model("llama"))
    paths = []
    for k, (method, seed) in enumerate([("ila", 0), ("snr", 0), ("ila", 1)]):
        torch.manual_seed(k)
        r = Ranking.from_scores(layers, torch.randn(len(layers)).tolist(), {"method": method, "seed": seed})
        paths.append(tmp_path / f"r{k}.json")
        r.save(paths[-1])
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, paths), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ila · seed 0" in printed and "snr · seed 0" in printed and "ila · seed 1" in printed
    loaded = [Ranking.load(p) for p in paths]
    for name, measure in (("jaccard", lambda a, b: a.jaccard(b, 0.75)), ("spearman", lambda a, b: a.spearman(b))):
        with open(out / f"{name}.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0][1:] == ["ila · seed 0", "snr · seed 0", "ila · seed 1"]
        for i, j in itertools.product(range(3), repeat=2):
            want = 1.0 if i == j else measure(loaded[i], loaded[j])
            assert float(rows[1 + i][1 + j]) == pytest.approx(want, abs=1e-4)
    assert (out / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "comparison.json").read_text())["top"] == 0.75


def test_compare_at_block_level_ranks_blocks_by_their_layers_mean_rank(tmp_path, capsys):
    """A layer-level signal against a block-level reference: both reduced to block orders."""
    layers = discover_layers(deep_model("llama"))  # 4 blocks × 7 roles
    # layer scores: block 2 holds the top 7 layers, block 0 the next, then 3, then 1 (scales differ by role)
    place = {2: 3, 0: 2, 3: 1, 1: 0}
    layer_level = Ranking.from_scores(layers, [(place[x.block] + 0.01 * i) * (1 + 9 * (x.role == "q_proj"))
                                               for i, x in enumerate(layers)], {"method": "a"})
    block_level = Ranking.from_scores(layers, [float(place[x.block]) for x in layers], {"method": "b"})
    blocks = layer_level.by_block()
    assert [x.name for x in blocks.ordered()] == ["block 2", "block 0", "block 3", "block 1"]
    assert [x.name for x in block_level.by_block().ordered()] == ["block 2", "block 0", "block 3", "block 1"]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    layer_level.save(paths[0])
    block_level.save(paths[1])
    assert main(["compare", *map(str, paths), "--level", "block", "--top", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "jaccard@0.5 = 1.000 (block orders)" in printed and "spearman = 1.000 (block orders)" in printed
    assert main(["compare", *map(str, paths)]) == 0  # layer orders differ inside the blocks
    assert "spearman = 1.000" not in capsys.readouterr().out
