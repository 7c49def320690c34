"""Sizes and durations as users write them in config.toml (SPEC: "config.toml")."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minibatch.units import DURATION_UNITS, MAX_SIZE, SIZE_UNITS, parse_duration, parse_size

EXACT = 2**53  # every integer up to here is exactly representable as a float

BINARY = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
DECIMAL = {"kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE_SPELLINGS = {"": 1, "B": 1, **BINARY, **DECIMAL}


def _cased(unit: str) -> st.SearchStrategy[str]:
    return st.sampled_from([unit, unit.lower(), unit.upper()])


size_units = st.sampled_from(sorted(SIZE_SPELLINGS)).flatmap(
    lambda unit: st.tuples(_cased(unit), st.just(SIZE_SPELLINGS[unit]))
)


# --------------------------------------------------------------------------- sizes


@given(unit=size_units, data=st.data(), sep=st.sampled_from(["", " "]))
def test_size_round_trips_integer_with_unit(unit, data, sep):
    spelling, multiplier = unit
    number = data.draw(st.integers(0, EXACT // multiplier), label="number")
    text = f"{number}{sep}{spelling}"
    assert parse_size(text) == number * multiplier
    assert isinstance(parse_size(text), int)


@given(st.integers(0, MAX_SIZE))
def test_size_plain_int_is_bytes(number):
    assert parse_size(number) == number


@pytest.mark.parametrize("value", [MAX_SIZE + 1, 1e300, "9EiB", "10000000TiB"])
def test_sizes_beyond_8_eib_are_errors(value):
    with pytest.raises(ValueError, match="too large|bad size"):
        parse_size(value)


@given(st.integers(0, EXACT))
def test_size_plain_int_string_is_bytes(number):
    assert parse_size(str(number)) == number


def test_size_huge_digit_string_is_exact():
    assert parse_size(str(2**53 + 1)) == 2**53 + 1


@given(
    unit=st.sampled_from(sorted(DECIMAL)),
    thousandths=st.integers(0, 10**6),
)
@example(unit="kB", thousandths=1001)
def test_size_round_trips_decimal_fraction(unit, thousandths):
    text = f"{thousandths // 1000}.{thousandths % 1000:03d}"
    expected = Fraction(thousandths, 1000) * DECIMAL[unit]
    assert expected.denominator == 1  # the value is a whole number of bytes
    assert parse_size(text + unit) == int(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("64MB", 64 * 10**6),
        ("1KiB", 1024),
        ("1kb", 1000),
        ("3TiB", 3 * 2**40),
        ("1TB", 10**12),
        ("10B", 10),
        ("512 MiB", 512 * 2**20),
        (" 64MB ", 64 * 10**6),
        ("512mib", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("0.5MiB", 2**19),
        ("0", 0),
        ("1024", 1024),
        (0, 0),
        (1, 1),
        (1048576, 2**20),
        (2.0, 2),
    ],
)
def test_size_accepted_forms(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -1.0,
        "-1",
        "-5MiB",
        True,
        False,
        "12XB",
        "12K",
        "",
        "   ",
        "abc",
        "MiB",
        "1.5.5MB",
        "5 MiB MiB",
        None,
        float("nan"),
        float("inf"),
        1.5,  # chunk_bytes = 1.5 was 1 byte: 116,280 chunks for 4.7 MB
        [512],
        {"MiB": 1},
    ],
)
def test_size_rejected_forms(value):
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


def test_size_unit_table_has_the_documented_units():
    for unit, multiplier in SIZE_SPELLINGS.items():
        assert SIZE_UNITS[unit.lower()] == multiplier


# ----------------------------------------------------------------------- durations

duration_units = st.sampled_from(sorted(DURATION_UNITS))
SECONDS = {"ms": Fraction(1, 1000), "s": 1, "m": 60, "h": 3600, "d": 86400}


@given(unit=duration_units, number=st.integers(0, 10**9), sep=st.sampled_from(["", " "]))
def test_duration_round_trips_integer_with_unit(unit, number, sep):
    got = parse_duration(f"{number}{sep}{unit}")
    assert isinstance(got, float)
    assert got == pytest.approx(float(number * SECONDS[unit]), rel=1e-12, abs=1e-12)


@given(unit=duration_units, thousandths=st.integers(0, 10**9))
def test_duration_round_trips_decimal_with_unit(unit, thousandths):
    text = f"{thousandths // 1000}.{thousandths % 1000:03d}{unit}"
    expected = float(Fraction(thousandths, 1000) * SECONDS[unit])
    assert parse_duration(text) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(
    parts=st.lists(
        st.tuples(st.sampled_from(["d", "h", "m", "s", "ms"]), st.integers(0, 10_000)),
        min_size=1,
        max_size=5,
        unique_by=lambda part: part[0],
    ),
    sep=st.sampled_from(["", " "]),
)
def test_duration_round_trips_compound(parts, sep):
    text = sep.join(f"{number}{unit}" for unit, number in parts)
    expected = float(sum(number * SECONDS[unit] for unit, number in parts))
    assert parse_duration(text) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(st.floats(0, 1e12, allow_nan=False, allow_infinity=False))
def test_duration_numeric_seconds_round_trip(seconds):
    assert parse_duration(seconds) == seconds
    assert parse_duration(repr(seconds)) == seconds


@given(st.integers(0, 10**12))
def test_duration_int_seconds_round_trip(seconds):
    assert parse_duration(seconds) == float(seconds)
    assert parse_duration(str(seconds)) == float(seconds)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("2h5m10s", 7510.0),
        ("1m500ms", 60.5),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("0.25s", 0.25),
        ("30S", 30.0),
        (" 10m ", 600.0),
        ("0s", 0.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_duration_accepted_forms(text, expected):
    got = parse_duration(text)
    assert isinstance(got, float)
    assert math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-1",
        "-30s",
        "-1h30m",
        True,
        False,
        "12XB",
        "",
        "   ",
        "abc",
        "s",
        "10 minutes",
        "1h30",
        "30s!",
        "nan",
        "inf",
        float("nan"),
        float("inf"),
        None,
        ["30s"],
    ],
)
def test_duration_rejected_forms(value):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)
