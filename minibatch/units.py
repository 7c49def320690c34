"""Sizes ("512MiB", "64MB", 1024) and durations ("500ms", "1h30m", 2.5) as users write them."""

from __future__ import annotations

import math
import re
from decimal import Decimal

SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


MAX_SIZE = 2**63 - 1  # what the manifest's BIGINT, rlimits and budgets hold


def parse_size(value: object) -> int:
    """Bytes from `"512MiB"`, `"2GiB"`, `"64MB"` or a plain non-negative number."""
    size = _parse_size(value)
    if size > MAX_SIZE:
        raise ValueError(f"size {value!r} is too large (at most {MAX_SIZE} bytes, 8 EiB)")
    return size


def _parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f'expected a size such as "512MiB", got {value!r}')
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"size must be a non-negative number of bytes, got {value!r}")
        if not float(value).is_integer():  # chunk_bytes = 1.5 was 1 byte: a unit was meant
            raise ValueError(f'size {value!r}: a plain number is whole bytes (with a unit: "{value}MiB")')
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f'expected a size such as "512MiB", got {value!r}')
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise ValueError(f'bad size {value!r} (expected e.g. "512MiB", "2GiB", "64MB" or bytes)')
    return int(Decimal(match.group(1)) * SIZE_UNITS[unit])  # exact, unlike float


def parse_duration(value: object) -> float:
    """Seconds from `"500ms"`, `"30s"`, `"10m"`, `"2h"`, `"1h30m"` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration such as "30s", got {value!r}')
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"duration must be a non-negative number of seconds, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f'expected a duration such as "30s", got {value!r}')
    text = value.strip().lower()
    try:
        return parse_duration(float(text))
    except ValueError:
        pass
    parts = _DURATION_PART_RE.findall(text)
    if not text or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f'bad duration {value!r} (expected e.g. "500ms", "30s", "10m", "2h")')
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)


def format_size(num_bytes: float) -> str:
    """Human-readable binary size, for summaries and logs."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
