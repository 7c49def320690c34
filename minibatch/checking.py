"""Typed reads out of a TOML table that record every error (as "where.key: problem") instead
of raising, so that a config file's problems are all reported at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from minibatch.units import parse_size


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

    def positive_int(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if value < 1:
            self.error(key, f"must be at least 1, got {value}")
            return default
        return value

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
            self.error(key, "unknown key")


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
    return value


def timezone_name(c: Checker, default: str) -> str:
    name = c.get("timezone", str, default)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # "Europe" is a directory of zones
        c.error("timezone", f"unknown time zone {name!r} (expected an IANA name like 'Europe/Berlin')")
        return default
    return name


def choice(c: Checker, key: str, choices: tuple[str, ...], default: str) -> str:
    value = c.get(key, str, default)
    if value not in choices:
        c.error(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return default
    return value
