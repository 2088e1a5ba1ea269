"""Atomic file writes: a temporary file in the same folder, renamed over the target (no half-written files)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ila.errors import IlaError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends without error,
    removed otherwise. The suffix is kept, for writers that pick the format from it (matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # readable by everyone, as a normal file would be
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_json(path: Path, label: str) -> Any:
    """Parse a JSON file; one-line `IlaError` starting with `label` when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IlaError(f"{label}: not valid JSON ({exc})") from None


def check_safetensors(folder: Path, label: str) -> None:
    """Read the header of every `*.safetensors` file in FOLDER; a one-line error naming the first file that is
    truncated or damaged (safetensors' own error names no file). LABEL starts the message ("model x")."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError; every one means "unreadable"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise IlaError(f"{label}: {file} is not a readable safetensors file ({reason}); "
                           "it may be truncated or damaged, write or download it again") from None


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def slug(value: object, *, keep: str = "._-", empty: str = "x") -> str:
    """VALUE (None: "default") as a file or folder name: each run of characters other than ASCII letters, digits
    and KEEP becomes "_", leading and trailing "_" are dropped, 60 characters at most; EMPTY if nothing is left."""
    text = "default" if value is None else str(value)
    return re.sub(f"[^A-Za-z0-9{re.escape(keep)}]+", "_", text).strip("_")[:60] or empty


def check_output_folder(out: Path, marker: str, *, resume: bool = False) -> None:
    """Refuse an output path that is a file, is not writable, holds a finished run, or holds an unfinished run
    (checkpoints) when not resuming."""
    if out.exists() and not out.is_dir():
        raise IlaError(f"output folder {out}: exists and is not a folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise IlaError(f"output folder {out}: {parent} is not a writable folder")
    if (out / marker).exists():
        raise IlaError(f"output folder {out}: already holds a finished run ({marker}); choose another --out")
    if not resume and any((out / "checkpoints").glob("checkpoint-*")):
        raise IlaError(f"output folder {out}: holds an unfinished run; pass --resume to continue it, or another --out")
