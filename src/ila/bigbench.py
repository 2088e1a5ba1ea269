"""The BIG-bench source archive: `bigbench:TASK[/SUBTASK_GLOB,...]` specs and the files they select.

The archive is the `bigbench==1.0.0` sdist (`ila.assets.bigbench_archive()`, fetched once with pip). It is never
unpacked: a first scan writes `index.json` (task names, `task.json` paths) under
`cache_dir()/bigbench/<archive stem>/`, and the members a spec needs are extracted below it into `tasks/`.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import random
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ila.errors import IlaError
from ila.io import write_bytes_atomic

log = logging.getLogger(__name__)

PREFIX = "bigbench:"
"""What starts a BIG-bench spec: `bigbench:TASK[/SUBTASK_GLOB,...]`."""

_GLOB_CHARS = "*?["

_T = TypeVar("_T")


def _archive_and_cache() -> tuple[Path, Path]:
    """(the archive, fetched if needed; its cache folder `cache_dir()/bigbench/<archive stem>`)."""
    from ila.assets import bigbench_archive, cache_dir

    archive = bigbench_archive()
    stem = archive.name.removesuffix(".tar.gz").removesuffix(".zip")
    return archive, cache_dir() / "bigbench" / stem


def _task_rel(member_name: str) -> str | None:
    """`TASK/...` relative to `benchmark_tasks/`, or None for members outside it."""
    _, sep, rel = member_name.partition("/benchmark_tasks/")
    return rel if sep and rel else None


def _is_task_file(rel: str) -> bool:
    """Whether REL (relative to `benchmark_tasks/`) is a `TASK/task.json` or `TASK/SUBTASK/task.json`."""
    parts = rel.split("/")
    return parts[-1] == "task.json" and len(parts) in (2, 3)


def _scan_archive(archive: Path, cache: Path, want: Callable[[str], bool], *,
                  needed: set[str] | None = None) -> dict[str, Any]:
    """Stream the archive once, extracting the file members under `benchmark_tasks/` that WANT accepts (by
    their path relative to it) into CACHE/tasks.

    With NEEDED, stop as soon as all of those are extracted; otherwise read to the end and return the index
    (all task names and all `TASK/task.json`, `TASK/SUBTASK/task.json` paths).
    """
    tasks: set[str] = set()
    task_files: list[str] = []
    remaining = set(needed) if needed is not None else None
    try:
        with tarfile.open(archive, mode="r|*", bufsize=1 << 20) as tf:
            for member in tf:
                rel = _task_rel(member.name)
                if rel is None:
                    continue
                parts = rel.split("/")
                if len(parts) > 1:
                    tasks.add(parts[0])
                if not member.isfile():
                    continue
                if _is_task_file(rel):
                    task_files.append(rel)
                if want(rel):
                    f = tf.extractfile(member)
                    if f is not None:
                        write_bytes_atomic(cache / "tasks" / rel, f.read())
                if remaining is not None:
                    remaining.discard(rel)
                    if not remaining:
                        break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise IlaError(f"{archive}: cannot read the BIG-bench archive ({e}); "
                       "delete it to download it again") from None
    return {"tasks": sorted(tasks), "task_files": sorted(task_files)}


def _index(archive: Path, cache: Path, want: Callable[[str], bool]) -> dict[str, Any]:
    """The cached member index of ARCHIVE; built once (a ~5 s scan) that also extracts WANT."""
    index_path = cache / "index.json"
    stamp = {"archive": archive.name, "size": archive.stat().st_size}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            if {k: index.get(k) for k in stamp} == stamp:
                return index
        except (OSError, json.JSONDecodeError):
            pass
    log.info("indexing %s (once)", archive)
    index = {**stamp, **_scan_archive(archive, cache, want)}
    write_bytes_atomic(index_path, json.dumps(index).encode())
    return index


def _match_subtask(name: str, selector: str) -> bool:
    """A glob SELECTOR matches as a glob; a plain one matches NAME exactly or as its `SELECTOR_` prefix."""
    if any(c in selector for c in _GLOB_CHARS):
        return fnmatch.fnmatchcase(name, selector)
    return name == selector or name.startswith(selector + "_")


def _suggest(wanted: str, names: Sequence[str], n: int = 5) -> str:
    close = difflib.get_close_matches(wanted.strip(_GLOB_CHARS + "]"), names, n=n, cutoff=0.4)
    return ", ".join(close or list(names)[:n])


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """(task, subtask selectors) of `bigbench:TASK[/SUBTASK_GLOB,...]`; the selectors are [] without '/'."""
    body = spec[len(PREFIX):].strip()
    task, _, sub = body.partition("/")
    task = task.strip()
    selectors = [s.strip() for s in sub.split(",") if s.strip()] if sub else []
    if not task:
        raise IlaError(f"data {spec!r}: missing task name, expected 'bigbench:TASK[/SUBTASK_GLOB,...]'")
    if sub and not selectors:
        raise IlaError(f"data {spec!r}: empty subtask selector after '/', "
                       "expected 'bigbench:TASK/SUBTASK_GLOB'")
    return task, selectors


def task_files(spec: str) -> list[tuple[str, Path]]:
    """The `(name, extracted task.json path)` pairs a `bigbench:` SPEC selects, extracting them if needed.

    NAME is the subtask, or the task when it has no subtasks. A plain selector matches a subtask by name or
    `NAME_` prefix, a glob by `fnmatch`.
    """
    task, selectors = parse_spec(spec)

    def wanted_early(rel: str) -> bool:  # what to extract during a first (indexing) scan
        parts = rel.split("/")
        if not _is_task_file(rel) or parts[0] != task:
            return False
        return len(parts) == 2 or not selectors or any(_match_subtask(parts[1], s) for s in selectors)

    archive, cache = _archive_and_cache()
    index = _index(archive, cache, wanted_early)
    if task not in index["tasks"]:
        raise IlaError(f"data {spec!r}: no BIG-bench task {task!r} in {archive.name}; "
                       f"close names: {_suggest(task, index['tasks'])}")
    files = [rel for rel in index["task_files"] if rel.split("/")[0] == task]
    subtasks = sorted(rel.split("/")[1] for rel in files if rel.count("/") == 2)
    if not files:
        raise IlaError(f"data {spec!r}: BIG-bench task {task!r} is programmatic (no task.json), "
                       "expected a JSON task")
    if selectors and not subtasks:
        raise IlaError(f"data {spec!r}: BIG-bench task {task!r} has no subtasks, use 'bigbench:{task}'")
    if subtasks:
        chosen: list[str] = []
        for sel in selectors or ["*"]:
            hits = [s for s in subtasks if _match_subtask(s, sel)]
            if not hits:
                raise IlaError(f"data {spec!r}: no subtask of {task!r} matches {sel!r}; {len(subtasks)} "
                               f"subtasks, e.g. {_suggest(sel, subtasks)}")
            chosen += [s for s in hits if s not in chosen]
        rels = [f"{task}/{s}/task.json" for s in chosen]
        names = chosen
    else:
        rels, names = [f"{task}/task.json"], [task]
    missing = {rel for rel in rels if not (cache / "tasks" / rel).is_file()}
    if missing:
        log.info("extracting %d task file(s) from %s", len(missing), archive.name)
        _scan_archive(archive, cache, missing.__contains__, needed=missing)
        lost = sorted(rel for rel in missing if not (cache / "tasks" / rel).is_file())
        if lost:
            raise IlaError(f"{archive}: member {lost[0]} listed in the index but not found; "
                           f"delete {cache} to rebuild the index")
    return [(name, cache / "tasks" / rel) for name, rel in zip(names, rels)]


def member_file(rel: str) -> Path:
    """Path of the archive member `benchmark_tasks/REL` (any file, e.g. `truthful_qa/task_mc.json`),
    extracted once into the cache without consulting the index."""
    archive, cache = _archive_and_cache()
    target = cache / "tasks" / rel
    if target.is_file():
        return target
    log.info("extracting %s from %s", rel, archive.name)
    _scan_archive(archive, cache, {rel}.__contains__, needed={rel})
    if not target.is_file():
        raise IlaError(f"{archive}: no member ending in /benchmark_tasks/{rel}")
    return target


def read_task(path: Path) -> dict[str, Any]:
    """The JSON object of an extracted task file; IlaError unless it is a dict with an `examples` list."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IlaError(f"{path}: unreadable BIG-bench task file ({e}); "
                       "delete it to extract it again") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise IlaError(f"{path}: field 'examples' missing or not a list, "
                       "expected a list of BIG-bench examples")
    return data


def sample_evenly(groups: Sequence[Sequence[_T]], k: int, seed: int) -> list[_T]:
    """K items spread as evenly as the group sizes allow; each group keeps its order. Deterministic."""
    quotas = [0] * len(groups)
    left = min(k, sum(len(g) for g in groups))
    order = sorted(range(len(groups)), key=lambda i: len(groups[i]))
    for pos, i in enumerate(order):
        share = -(-left // (len(order) - pos))  # ceil: the remainder goes to the larger groups first
        quotas[i] = min(len(groups[i]), share)
        left -= quotas[i]
    rng = random.Random(seed)
    out = []
    for group, quota in zip(groups, quotas):
        out += [group[j] for j in sorted(rng.sample(range(len(group)), quota))]
    return out
