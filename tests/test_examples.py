"""The scripts in examples/ run as users run them (TRL's SFTTrainer on a tiny model), and ila's pieces do there
what they do in `ila train`: LoRA on exactly the selected modules; LISA trains only its sampled blocks."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, WORDS, make_tokenizer
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from ila.layers import discover_layers
from ila.ranking import Ranking

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    """A 4-block llama with its tokenizer, and a text-rows data file (TRL's plain-text form)."""
    root = tmp_path_factory.mktemp("examples")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 4})).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(WORDS, k=12))} for _ in range(32)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _run(script: str, *args: object, tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], capture_output=True,
                            text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_sft_top30_adapts_exactly_the_top_layers(deep, tmp_path):
    layers = discover_layers(LlamaForCausalLM.from_pretrained(deep / "model"))
    ranking = Ranking.from_scores(layers, [random.Random(1).random() for _ in layers], {"method": "test"})
    ranking.save(tmp_path / "ranking.json")
    _run("trl_sft_top30.py", "--model", deep / "model", "--data", deep / "data.jsonl", "--ranking",
         tmp_path / "ranking.json", "--out", tmp_path / "sft", "--max-steps", 3, tmp_path=tmp_path)
    config = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    top = {x.name for x in ranking.top(0.3)}
    assert set(config["target_modules"]) == top and len(top) < len(layers)
    weights = load_file(tmp_path / "sft" / "adapter_model.safetensors")
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in weights}
    assert adapted == top
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it trained


def test_sft_lisa_trains_only_sampled_blocks(deep, tmp_path):
    _run("trl_sft_lisa.py", "--model", deep / "model", "--data", deep / "data.jsonl", "--out", tmp_path / "lisa",
         "--layers", 1, "--interval", 2, "--max-steps", 4, tmp_path=tmp_path)
    record = json.loads((tmp_path / "lisa" / "lisa_schedule.json").read_text())
    active = {b for interval in record["lisa_schedule"] for b in interval["active"]}
    assert len(record["lisa_schedule"]) == 2 and 1 <= len(active) <= 2
    base = LlamaForCausalLM.from_pretrained(deep / "model").state_dict()
    tuned = load_file(tmp_path / "lisa" / "model.safetensors")
    for block in range(4):
        names = [k for k in base if k.startswith(f"model.layers.{block}.")]
        changed = any(not torch.equal(base[k], tuned[k]) for k in names)
        assert changed == (block in active), block
    assert not torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])
