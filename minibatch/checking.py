"""Typed reads out of a TOML table that record every error (as "where.key: problem") instead
of raising, so that a config file's problems are all reported at once."""

from __future__ import annotations

import difflib
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from minibatch.units import parse_duration, parse_size

DEFAULT_HOOK_TIMEOUT = 10.0
PATH_KEYS = {"input", "output", "state_dir", "quarantine", "api_token_file"}  # no shell expands them
BAD_URL = "(unparsable URL)"


class Checker:
    """Reads typed values out of one TOML table, recording errors instead of raising."""

    def __init__(self, table: dict[str, Any], where: str, errors: list[str]) -> None:
        self.table = table
        self.where = where
        self.errors = errors

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.where}.{key}: {message}")

    def get(self, key: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self.table:
            return default
        value = self.table[key]
        if key in PATH_KEYS and (shell := _shell_syntax(value)):
            self.error(
                key, f"{shell!r}: a path is read literally, `~` is not your home nor `${{...}}` a variable"
            )
            return default
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            self.error(key, f"expected {kind_name(kinds)}, got {value!r}")
            return default
        if not isinstance(value, kinds):
            self.error(key, f"expected {kind_name(kinds)}, got {type(value).__name__} {value!r}")
            return default
        return value

    def parsed(self, key: str, parse: Callable[[object], Any], default: Any) -> Any:
        if key not in self.table:
            return default
        try:
            return parse(self.table[key])
        except ValueError as exc:
            self.error(key, str(exc))
            return default

    def positive_duration(self, key: str, default: float) -> float:
        value = self.parsed(key, parse_duration, default)
        if value <= 0:
            self.error(key, "must be greater than zero")
            return default
        return float(value)

    def positive_int(self, key: str, default: int, most: int = 2**31 - 1) -> int:
        value = self.get(key, int, default)
        if not 1 <= value <= most:
            self.error(key, f"must be from 1 to {most}, got {value}")
            return default
        return int(value)

    def string_list(self, key: str) -> tuple[str, ...] | None:
        value = self.get(key, (str, list))
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(item, str) and item for item in items):
            self.error(key, "expected a string or a list of non-empty strings")
            return None
        return tuple(items)

    def unknown_keys(self, allowed: set[str]) -> None:
        for key in sorted(set(self.table) - allowed):
            close = difflib.get_close_matches(key, allowed, n=1)
            self.error(key, f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key")


def kind_name(kinds: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        bool: "true/false",
    }
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def positive_size(c: Checker, key: str, default: int) -> int:
    value = c.parsed(key, parse_size, default)
    if value < 1:
        c.error(key, "must be greater than zero")
        return default
    return int(value)


def timezone_name(c: Checker, default: str) -> str:
    name = c.get("timezone", str, default)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # "Europe" is a directory of zones
        c.error("timezone", f"unknown time zone {name!r} (expected an IANA name like 'Europe/Berlin')")
        return default
    return str(name)


def state_dir_in(c: Checker, base_dir: Path) -> Path:
    """state_dir, where DuckDB must open the manifest: a '?' in its path starts the file's
    options to DuckDB (the manifest's write-ahead log went elsewhere)."""
    place = base_dir / str(c.get("state_dir", str, ".minibatch"))
    if "?" in str(place):
        c.error("state_dir", f"{place}: DuckDB cannot keep its manifest on a path with '?'; choose another")
    return place


def choice(c: Checker, key: str, choices: tuple[str, ...], default: str) -> str:
    value = c.get(key, str, default)
    if value not in choices:
        c.error(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return default
    return str(value)


# -- alerting hooks (fired by hooks.py) ---------------------------------------------------


@dataclass(frozen=True)
class Hook:
    command: str | None = None  # run by /bin/sh, like a crontab line
    url: str | None = None  # receives a JSON POST
    timeout: float = DEFAULT_HOOK_TIMEOUT


def parse_hook(value: Any, where: str, errors: list[str]) -> Hook | None:
    """`"cmd"`, `"https://..."` or `{ command = ..., url = ..., timeout = ... }`; {} means none."""
    if isinstance(value, str):
        value = {"url": value} if value.startswith(("http://", "https://")) else {"command": value}
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a command, a URL or a table {{ command, url, timeout }}")
        return None
    for key in sorted(set(value) - {"command", "url", "timeout"}):
        errors.append(f"{where}.{key}: unknown key (expected command, url, timeout)")
    command, url = value.get("command"), value.get("url")
    if command is not None and not (isinstance(command, str) and command.strip()):
        errors.append(f"{where}.command: expected a non-empty string")
    if url is not None:
        _check_url(url, f"{where}.url", errors)
    try:
        timeout = parse_duration(value.get("timeout", DEFAULT_HOOK_TIMEOUT))
    except ValueError as exc:
        errors.append(f"{where}.timeout: {exc}")
        timeout = DEFAULT_HOOK_TIMEOUT
    if timeout <= 0:
        errors.append(f"{where}.timeout: must be greater than zero")
    if command is None and url is None:
        return None
    return Hook(command=command, url=url, timeout=timeout)


def _check_url(url: Any, where: str, errors: list[str]) -> None:
    """Errors name the URL without its secrets: a daemon logs a rejected reload's errors."""
    if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        shown = url_label(url) if isinstance(url, str) else repr(url)
        errors.append(f"{where}: expected an http:// or https:// URL, got {shown}")
    elif re.search(r"[\x00-\x20\x7f]", url):
        errors.append(f"{where}: contains whitespace or control characters ({url_label(url)})")
    elif url_label(url) == BAD_URL or not urllib.parse.urlsplit(url).hostname:
        errors.append(f"{where}: expected a host and, if any, a port from 0 to 65535")


def url_label(url: str) -> str:
    """What the log calls a URL: scheme://host:port/path, without user:password@, query or fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return BAD_URL
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((parts.scheme, f"{host}:{port}" if port else host, parts.path, "", ""))


def _shell_syntax(value: Any) -> str | None:
    """A path (or one of a list) that a shell would have expanded, or None."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and (text.startswith("~") or "${" in text):
            return text
    return None
