"""Atomic file writes: a temporary file in the same folder, renamed over the target (no half-written files)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ila.errors import IlaError


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (readable by everyone, as a normal file would be)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


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
