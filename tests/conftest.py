"""Shared fixtures: tiny random-init causal LMs of several architectures, a word-level tokenizer, tiny data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

# huggingface_hub reads these when first imported: set them before transformers is.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WORDS = [f"w{i}" for i in range(56)]
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<user>", "<assistant>", "<end>", "\n"]
VOCAB = len(SPECIALS) + len(WORDS)  # 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
             bos_token_id=2, eos_token_id=3, initializer_range=0.2)

ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=16)),
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**SMALL)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                             n_positions=128, bos_token_id=2, eos_token_id=3,
                                                             initializer_range=0.2)),
}


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch]().eval()


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: a fixed phrase, then the last instruction word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS[:40], 5)
        rows.append({"instruction": " ".join(words), "input": "", "output": f"w50 w51 w52 {words[-1]}"})
    return rows


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(96)))
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Saved tiny models (with tokenizer) by architecture name, created on first use."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            path = root / arch
            make_model(arch).save_pretrained(path)
            make_tokenizer().save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return get
