"""Row-level checks: named SQL conditions on each chunk's result rows, with what to do with
the rows that fail them; and output checks on a reduce job's result.

A row passes a check when its condition is true (false and NULL fail it: write
`x IS NULL OR x >= 0` to let NULLs through). A row that fails several checks meets the
strictest action: `fail` (the chunk fails) > `quarantine` (the row goes to the job's
quarantine directory, with the names of the checks it failed in `_check`) > `drop` > `warn`
(counted only). Counts are per check, so a row counts once for each check it fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minibatch.checking import Checker
from minibatch.params import sql_params

if TYPE_CHECKING:
    import pyarrow as pa

ACTIONS = ("warn", "drop", "quarantine", "fail")
OWN_PLACES = (  # a job's directories (layout.py)
    ("output", "{}"), ("staging", ".{}.minibatch-staging"), ("parts", ".{}.minibatch-parts"),
    ("malformed rows", "{}.malformed"),
)  # fmt: skip
OUTPUT_ACTIONS = ("warn", "fail")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
CHECK_COLUMN = "_check"
ROW_INDEX = "__minibatch_row"
AGGREGATE = "a check is a condition on each row, not an aggregate (for one over all rows: avg(x) OVER ())"


class CheckFailed(Exception):
    """A `fail` check found rows that fail it."""


@dataclass(frozen=True)
class Check:
    name: str
    sql: str
    action: str


@dataclass(frozen=True)
class Checks:
    rows: tuple[Check, ...] = ()
    max_bad_fraction: float | None = None  # of a run's checked rows dropped or quarantined
    quarantine: Path | None = None  # where quarantined rows go, when a check quarantines
    output: tuple[Check, ...] = ()  # on a reduce job's result, before it is published
    output_rows_change: float | None = None  # 0.5: within 50% of the previous result's rows

    def beside(self, output: Path) -> Checks:
        """These checks for a parameter set whose output is `output`: its own quarantine."""
        if self.quarantine is None:
            return self
        return replace(self, quarantine=default_quarantine(output))

    def facts(self, output: Path) -> dict[str, Any]:
        """What a chunk's result depends on: the checks decide which rows it keeps, and a
        quarantine set elsewhere than beside `output` where the rest go (moved, every chunk's
        go there anew; beside the output, they follow it as its parts do)."""
        facts: dict[str, Any] = {}
        if self.rows:
            facts["checks"] = [[c.name, c.sql, c.action] for c in self.rows]
        if self.quarantine is not None and self.quarantine != default_quarantine(output):
            facts["quarantine"] = str(self.quarantine)
        return facts


def default_quarantine(output: Path) -> Path:
    return output.with_name(output.name + ".quarantine")


@dataclass
class Checked:
    table: pa.Table  # the rows that go on to the output
    quarantined: pa.Table | None = None
    failed: dict[str, int] = field(default_factory=dict)  # check name -> rows that failed it
    bad: int = 0  # rows dropped or quarantined


def parse_checks(c: Checker, output: Path, base_dir: Path, parameterised: bool = False) -> Checks:
    rows = _check_list(c, "checks", ACTIONS)
    outputs = _check_list(c, "output_checks", OUTPUT_ACTIONS)
    fraction = c.get("max_bad_fraction", (int, float))
    if fraction is not None and not 0 <= fraction <= 1:
        c.error("max_bad_fraction", f"must be between 0 and 1, got {fraction}")
        fraction = None
    change = c.get("output_rows_change", (int, float))
    if change is not None and change < 0:
        c.error("output_rows_change", f"must be 0 or more (0.5: within 50%), got {change}")
        change = None
    if (outputs or change is not None) and "reduce_sql" not in c.table:
        c.error("output_checks", "apply to a reduce job's result: set reduce_sql, or use checks")
    place = c.get("quarantine", str)
    quarantine = None
    if any(check.action == "quarantine" for check in rows):
        quarantine = (base_dir / place).resolve() if place else default_quarantine(output)
        for what, name in OWN_PLACES:  # each is emptied of what is not its own: the rows would go
            mine = output.with_name(name.format(output.name))
            if mine == quarantine or mine in quarantine.parents or quarantine in mine.parents:
                c.error("quarantine", f"{quarantine} overlaps the job's {what} {mine}")
                break
        if place and parameterised:
            c.error(
                "quarantine", "a job with parameters keeps each set's quarantine beside its output: remove it"
            )
    elif place:
        c.error("quarantine", 'no check has action = "quarantine"')
    return Checks(rows, fraction, quarantine, outputs, change)


def _check_list(c: Checker, key: str, actions: tuple[str, ...]) -> tuple[Check, ...]:
    found: list[Check] = []
    for i, item in enumerate(c.get(key, list, [])):
        where = f"{key}[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "sql", "action"}:
            c.error(where, 'expected { name = "...", sql = "...", action = "..." }')
            continue
        name, sql, action = item.get("name"), item.get("sql"), item.get("action", "fail")
        if not isinstance(name, str) or not NAME_RE.match(name) or name in {x.name for x in found}:
            c.error(where, f"name must be a unique identifier ([A-Za-z_][A-Za-z0-9_]*), got {name!r}")
        elif not isinstance(sql, str) or not sql.strip():
            c.error(where, 'sql must be a boolean SQL expression over the rows, e.g. "amount >= 0"')
        elif action not in actions:
            c.error(where, f"action must be one of {', '.join(actions)}, got {action!r}")
        elif used := sql_params(sql):  # (DuckDB would refuse every chunk: "Values were not provided")
            c.error(
                where, f"sql {sql!r} uses ${used[0]}: checks take no parameters (filter in the job's sql)"
            )
        elif problem := _syntax_error(sql):
            c.error(where, f"sql {sql!r} does not parse: {problem}")
        else:
            found.append(Check(name, sql, action))
    return tuple(found)


def _syntax_error(sql: str) -> str | None:
    """DuckDB's parser on the condition alone (no columns bound: the result's are not known)."""
    import duckdb

    try:
        statements = duckdb.connect(":memory:").extract_statements(f"SELECT (\n{sql}\n)")
    except duckdb.Error as exc:
        return str(exc).splitlines()[0]
    return None if len(statements) == 1 else "more than one statement"


def apply_checks(table: pa.Table, checks: tuple[Check, ...]) -> Checked:
    """Evaluate every check on `table`'s rows (DuckDB, in the rows' order) and sort them out."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not checks or not table.num_rows:
        return Checked(table)
    if CHECK_COLUMN in table.column_names and any(c.action == "quarantine" for c in checks):
        raise ValueError(f"the result has a column {CHECK_COLUMN}: the quarantine adds it; rename yours")
    flags = _evaluate(table, checks)
    failed = {c.name: n for c, n in _counts(checks, flags).items()}
    for check in checks:
        if check.action == "fail" and failed[check.name]:
            raise CheckFailed(
                f"check {check.name!r} ({check.sql}) failed on {failed[check.name]} of {table.num_rows} rows"
            )
    drop = _any_failed(table.num_rows, [f for c, f in zip(checks, flags, strict=True) if c.action != "warn"])
    held = _any_failed(
        table.num_rows, [f for c, f in zip(checks, flags, strict=True) if c.action == "quarantine"]
    )
    quarantined = None
    if pc.any(held).as_py():
        label: Any = pa.array([""] * table.num_rows, pa.string())
        for check, flag in zip(checks, flags, strict=True):  # "a,b": the names of the checks it failed
            label = pc.if_else(flag, label, pc.binary_join_element_wise(label, check.name, ","))
        quarantined = table.append_column(CHECK_COLUMN, pc.utf8_ltrim(label, ",")).filter(held)
    bad = int(pc.sum(drop).as_py() or 0)
    return Checked(table.filter(pc.invert(drop)), quarantined, failed, bad)


def _evaluate(table: pa.Table, checks: tuple[Check, ...]) -> list[Any]:
    """Each check's verdict per row: true when the row passes (NULL counts as failing)."""
    import duckdb

    from minibatch.params import in_utc

    con = in_utc(duckdb.connect(":memory:", config={"threads": 1}))  # a worker is one of `workers` processes
    try:  # ordered by the row's index: a window in a check (OVER ...) would reorder the rows
        con.register("rows", table.append_column(ROW_INDEX, _row_index(table.num_rows)))
        columns = ", ".join(f"CAST(coalesce((\n{c.sql}\n), false) AS BOOLEAN)" for c in checks)
        verdicts = con.sql(f"SELECT {columns} FROM rows ORDER BY {ROW_INDEX}").to_arrow_table()
    except duckdb.BinderException as exc:
        if "GROUP BY" not in str(exc):  # an aggregate: other columns (ours too) are not grouped
            raise
        raise ValueError(AGGREGATE) from None
    finally:
        con.close()
    if verdicts.num_rows != table.num_rows:  # unnest(): rows of its own, not a verdict on each
        raise ValueError(
            f"a check is one condition on each row: its checks gave {verdicts.num_rows} verdicts for "
            f"{table.num_rows} rows (a set-returning function such as unnest, or an aggregate?)"
        )
    return [verdicts.column(i).combine_chunks() for i in range(len(checks))]


def _row_index(rows: int) -> Any:
    """0, 1, ..., rows - 1, made in Arrow. (These helpers turn no Python value into Arrow:
    pyarrow's first such conversion imports pandas where it is installed, ~0.5 s of CPU and
    ~50 MiB in every worker, which a SQL job with checks would otherwise pay on its first chunk.)"""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.indices_nonzero(pc.is_null(pa.nulls(rows)))


def _any_failed(rows: int, flags: list[Any]) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    result = pc.is_valid(pa.nulls(rows, pa.bool_()))  # all false
    for flag in flags:
        result = pc.or_(result, pc.invert(flag))
    return result


def check_output(table: pa.Table, checks: Checks, previous_rows: int | None) -> list[tuple[str, str]]:
    """Problems of a reduce result: (action, message) of each output check it fails."""
    problems = []
    counts = (
        _counts(checks.output, _evaluate(table, checks.output)) if checks.output and table.num_rows else {}
    )
    for check, failed in counts.items():
        if failed:
            problems.append(
                (check.action, f"output check {check.name!r} ({check.sql}) failed on {failed} rows")
            )
    change = checks.output_rows_change
    if change is not None and previous_rows:
        low, high = previous_rows * (1 - change), previous_rows * (1 + change)
        if not low <= table.num_rows <= high:
            problems.append((
                "fail", f"the result has {table.num_rows} rows, the previous one {previous_rows} "
                f"(output_rows_change = {change:g} allows {int(low)}..{int(high)})",
            ))  # fmt: skip
    return problems


def _counts(checks: tuple[Check, ...], flags: list[Any]) -> dict[Check, int]:
    """Rows that failed each check."""
    import pyarrow.compute as pc

    return {c: int(pc.sum(pc.invert(f)).as_py() or 0) for c, f in zip(checks, flags, strict=True)}


def too_many_bad(rows_bad: int, rows_out: int, limit: float | None) -> str | None:
    """Why a run failed its `max_bad_fraction`, if it did (judged before anything is published)."""
    checked = rows_bad + rows_out
    if limit is None or not checked or rows_bad / checked <= limit:
        return None
    return (
        f"{rows_bad} of the {checked} rows of the job's input ({rows_bad / checked:.2%}) failed checks that "
        f"drop or quarantine them, above max_bad_fraction = {limit:g}; the output was not published"
    )


def record_counts(
    manifest: Any, job: str, run_id: str, checks: Checks, ledger: Any
) -> dict[str, tuple[str, int]]:
    """This run's rows per check (zero for checks no row failed), in the manifest; returned."""
    counts = {c.name: (c.action, ledger.check_failures.get(c.name, 0)) for c in checks.rows}
    for name, (action, rows) in counts.items():
        manifest.named(
            "record_check", job=job, run_id=run_id, check_name=name, action=action, rows_failed=rows
        )
    return counts
