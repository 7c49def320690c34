"""A job's code: its module's files (found without importing them), importing its function
with the config directory on `sys.path` (the one place that changes it), and the definition
key that tells when results computed earlier are no longer current."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast


class JobCodeError(Exception):
    """A job's `process` cannot be imported, or is not a function."""


def module_files(base_dir: Path, process: str) -> list[Path]:
    """What importing `process`'s module from `base_dir` runs, found without running it: each
    package's __init__.py on the way and the module's own file (none for a namespace package)."""
    parts = process.partition(":")[0].split(".")
    files: list[Path] = []
    here = base_dir
    for i, part in enumerate(parts):
        if i == len(parts) - 1 and (here / f"{part}.py").is_file():
            return [*files, here / f"{part}.py"]
        here = here / part
        if (here / "__init__.py").is_file():
            files.append(here / "__init__.py")
    return files


def code_paths(base_dir: Path, process: str) -> list[Path]:
    """Every existing file and directory an import of `process`'s module from base_dir may
    read, for the daemon's strict modes: each package's directory, __init__ and __pycache__,
    the module's file (source, bytecode or extension), and their cached bytecode."""
    from importlib.machinery import all_suffixes

    def candidates(directory: Path, name: str) -> list[Path]:
        cache = directory / "__pycache__"
        return [
            *(directory / f"{name}{suffix}" for suffix in all_suffixes()),
            cache,
            *cache.glob(f"{name}.*.pyc"),
        ]

    found: list[Path] = []
    directory = base_dir
    for name in process.partition(":")[0].split("."):
        found += candidates(directory, name)
        directory = directory / name
        found += [directory, *candidates(directory, "__init__")]
    return [path for path in found if path.exists()]


def import_process(process: str, base_dir: Path) -> Callable[..., Any]:
    """Import `module:function` with the config directory first on sys.path."""
    module_name, _, func_name = process.partition(":")
    root = str(base_dir)
    if sys.path[:1] != [root]:
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # user code: any import failure is the job's error
        raise JobCodeError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    except SystemExit as exc:  # not ours to exit with (3 would say "already running")
        raise JobCodeError(f"cannot import {module_name!r}: it called sys.exit({exc.code!r})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise JobCodeError(f"{module_name} has no function {func_name!r}")
    return cast(Callable[..., Any], func)


def forget_package(process: str) -> None:
    """Drop a job's package from sys.modules so the next import reads it afresh."""
    root = process.partition(":")[0].split(".")[0]
    for name in [n for n in sys.modules if n == root or n.startswith(root + ".")]:
        del sys.modules[name]


def definition(
    process: str | None,
    sql: str | None,
    columns: tuple[str, ...] | None,
    version: str | None,
    base_dir: Path,
    shape: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(key, facts): what a chunk's result depends on besides its input rows. Without an
    explicit `version`, the source of the module named in `process` counts (its own file only:
    helpers it imports do not; set `version` to decide yourself)."""
    facts: dict[str, Any] = {
        "process": process,
        "sql": sql,
        "columns": list(columns) if columns else None,
        "version": version,
        **(shape or {}),  # partition_by: how parts are laid out (absent when unset: keys stay)
    }
    if version is None and process:
        files = module_files(base_dir, process)
        module = sys.modules.get(process.partition(":")[0])
        loaded = getattr(module, "__file__", None)
        source = Path(loaded) if loaded else None
        source = source or (files[-1] if files else None)
        facts["source"] = source_digest(str(source) if source else None)
    key = _digest(json.dumps(facts, sort_keys=True).encode())
    return key, facts


def changed_facts(old: str | None, new: dict[str, Any]) -> list[str]:
    """The names of the facts that differ from a stored definition's (JSON)."""
    try:
        before = json.loads(old) if old else {}
    except ValueError:
        before = {}
    return sorted(key for key in new.keys() | before.keys() if before.get(key) != new.get(key))


def source_digest(path: str | None) -> str | None:
    """What `definition` counts of a module's source file."""
    try:
        return _digest(Path(path).read_bytes()) if path else None
    except OSError:
        return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
