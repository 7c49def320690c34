"""Durable publication of chunk results: the one owner of what readers of an output see.

Invariants this module owns:
- The fence: a result becomes visible only by a rename the run's coordinator does, under
  the job lock. Workers write into the staging directory only, so a worker orphaned by a
  dead coordinator, or paused and resumed later, publishes nothing.
- Renamed results are made durable (`make_durable`, a directory fsync) before the ledger
  records them.
- Nothing is adopted or salvaged without a footer check that names the chunk and the job
  definition; what fails it is removed (it is minibatch's own file) and computed again.
- One output schema per job, decided in plan order (never by which worker finished first);
  every published part has it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from minibatch.layout import CHUNK_KEY, DEFINITION_KEY, HELD_MARK, INPUT_KEY, OutputLayout, part_name, publish
from minibatch.planner import Chunk
from minibatch.states import ErrorKind, EventKind
from minibatch.tasks import OutputUnwritable, SchemaMismatch, TaskError, TaskResult
from minibatch.userfiles import fsync_dir

if TYPE_CHECKING:
    import pyarrow as pa

    from minibatch.events import RunEvents  # not at run time: workers import this module

T = TypeVar("T")


@dataclass(frozen=True)
class Adopted:
    chunk: Chunk
    name: str
    rows: int
    nbytes: int


class ResultStore:
    def __init__(self, layout: OutputLayout, definition: str | None, events: RunEvents) -> None:
        self.layout = layout
        self.definition = definition
        self.events = events
        self.schema: pa.Schema | None = None  # the output's, once decided
        self.empty_schema: pa.Schema | None = None  # of results without rows: an empty reduce's

    # -- publication ----------------------------------------------------------------------------

    def publish(self, result: TaskResult, chunk_id: str) -> TaskError | None:
        """Make a staged result visible if it has the output's schema; else remove it and say
        why. Only the coordinator calls this, while it holds the job lock: the fence. The
        chunk's quarantined rows go first (replacing an earlier attempt's): a crash between
        the two renames leaves the chunk to compute again, which replaces them both."""
        staged = Path(result.staged) if result.staged else None
        try:
            if staged and self.schema is not None and result.schema is not None:
                check_schema(result.schema, self.schema)
        except SchemaMismatch as exc:
            _discard(result)
            assert self.schema is not None and result.schema is not None
            if conform_schema(result.schema, self.schema) is not None:  # the worker makes it fit
                return TaskError(kind=ErrorKind.ERROR, type=CONFORM, message=str(exc), traceback="")
            return TaskError(kind=ErrorKind.ERROR, type="SchemaMismatch", message=str(exc), traceback="")
        try:
            self._rename(result, chunk_id)
        except OSError as exc:  # the output moved, removed, made read-only: the machine's fault
            _discard(result)
            place = exc.filename2 or exc.filename  # a rename's target, else what failed
            return TaskError(kind=ErrorKind.ENVIRONMENT, type="OutputUnwritable",
                             message=str(OutputUnwritable(place, exc)), traceback="")  # fmt: skip
        return None

    def _rename(self, result: TaskResult, chunk_id: str) -> None:
        staged_in = {
            self.layout.quarantine: result.quarantine_staged,
            self.layout.malformed: result.malformed_staged,
        }
        for directory in self.layout.held_dirs:
            held = staged_in.get(directory)
            if held:
                directory.mkdir(parents=True, exist_ok=True)
                (directory / HELD_MARK).touch()
                publish(Path(held), directory / part_name(chunk_id))
            else:  # an earlier attempt's or definition's (a check's action changed)
                (directory / part_name(chunk_id)).unlink(missing_ok=True)
        if result.staged is not None:
            assert result.output_file is not None
            publish(Path(result.staged), self.layout.parts / result.output_file)

    def make_durable(self) -> None:
        """The renames so far survive a power loss: owed before recording them done."""
        fsync_dir(self.layout.parts)
        for held in self.layout.held_dirs:
            if held.is_dir():
                fsync_dir(held)

    def gate(self, order: Iterable[str]) -> SchemaGate[T]:
        return SchemaGate(self.schema, order)

    # -- what an earlier run left ---------------------------------------------------------------

    def adopt(self, chunks: Iterable[Chunk]) -> list[Adopted]:
        """Parts a killed run's coordinator renamed into place before it could record them.
        Those that fail the footer check are left as strays (see `remove_strays`)."""
        adopted = []
        for chunk in chunks:
            name = part_name(chunk.chunk_id)
            path = self.layout.parts / name
            try:
                rows = inspect_part(path, chunk.chunk_id, self.definition)
            except ValueError as exc:
                self.events(EventKind.PART_NOT_ADOPTED, file=str(path), reason=str(exc))
                continue
            adopted.append(Adopted(chunk, name, rows, path.stat().st_size))
        return adopted

    def salvage(self, todo: Iterable[Chunk]) -> list[tuple[Chunk, TaskResult]]:
        """Results that workers of a killed or stopped run staged and no coordinator published.
        Those of chunks still to do that pass the footer check are handed back as finished
        results (published like fresh ones); every other staged file is removed."""
        # Not with quarantine: a staged result without its quarantined rows would lose them.
        wanted = {c.chunk_id: c for c in todo} if not self.layout.held else {}
        salvaged = []
        for chunk_id, paths in self.layout.staged_results().items():
            chunk = wanted.get(chunk_id)
            keep = self._first_good(paths, chunk_id) if chunk is not None else None
            for path in paths:
                if keep is None or path != keep[0]:
                    path.unlink(missing_ok=True)
            if chunk is not None and keep is not None:
                path, rows = keep
                result = TaskResult(
                    rows_in=chunk.num_rows, rows_out=rows, bytes_in=chunk.nbytes,
                    bytes_out=path.stat().st_size, output_file=part_name(chunk_id), seconds=0.0,
                    schema=read_schema(path), staged=str(path),
                )  # fmt: skip
                salvaged.append((chunk, result))
        return salvaged

    def _first_good(self, paths: list[Path], chunk_id: str) -> tuple[Path, int] | None:
        for path in reversed(paths):  # any complete one will do; the latest attempt first
            try:
                return path, inspect_part(path, chunk_id, self.definition)
            except ValueError:
                continue
        return None

    def remove_strays(self, on_disk: set[str], done: dict[str, str | None]) -> int:
        """Parts (and quarantined rows) no finished chunk owns: only minibatch's own names."""
        strays = on_disk - {name for name in done.values() if name}
        self.layout.remove_parts(strays)
        owned = {part_name(chunk_id) for chunk_id in done}
        return len(strays | self.layout.remove_held(owned))

    def known_input_signature(self) -> str | None:
        """The input schema the output's parts were computed under (after `repair`, the
        manifest no longer knows it)."""
        for name in sorted(self.layout.part_files()):
            if found := input_signature_of(self.layout.parts / name):
                return found
        return None

    def load_schema(self, done: Iterable[str | None], stored: bytes | None) -> None:
        """The output schema of earlier runs: a finished part's, else the manifest's."""
        import pyarrow as pa

        for name in done:
            if name:
                self.schema = read_schema(self.layout.parts / name)
                return
        if stored:
            self.empty_schema = pa.ipc.read_schema(pa.py_buffer(stored))


def check_schema(got: pa.Schema, expected: pa.Schema) -> None:
    """Same column names and types, in order (nullability and metadata aside)."""
    have = [(f.name, f.type) for f in got]
    want = [(f.name, f.type) for f in expected]
    if have == want:
        return
    wanted, had = dict(want), dict(have)
    problems = [f"{n} is {t}, expected {wanted[n]}" for n, t in had.items() if n in wanted and wanted[n] != t]
    problems += [f"{n} ({t}) missing" for n, t in want if n not in had]
    problems += [f"{n} ({t}) unexpected" for n, t in have if n not in wanted]
    problems += [f"{n} appears {got.names.count(n)} times" for n in had if got.names.count(n) > 1]
    detail = "; ".join(problems) or "columns in another order"
    if any(str(t) == "null" for n, t in want if n in had and had[n] != t):  # every earlier row was null
        detail += " (only nulls there so far, so no type yet: `run-now --fresh` computes the output again)"
    raise SchemaMismatch(f"result does not match the output schema: {detail}")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A result gets the output schema's type for a column where the two differ only as a
    Parquet file cannot tell (the output's schema is read back from a part: `timestamp[s]`
    comes back `timestamp[ms]`, `date64` as `date32`), or in the name of UTC (`Etc/UTC` where
    TZ is unset, `UTC` where it is set); and for all-null columns typed `null` (Arrow's guess).
    Anything else is left for `check_schema` to judge."""
    import pyarrow as pa

    names = set(schema.names)
    for i, field in enumerate(table.schema):
        target = schema.field(field.name).type if field.name in names else field.type
        if field.type == target:
            continue
        if pa.types.is_null(field.type):
            table = table.set_column(i, field.name, pa.nulls(table.num_rows, target))
        elif _as_stored(field.type) == _as_stored(target):  # date64 is cut to days, as Parquet does
            column = table.column(i).cast(target, safe="date64" not in str(field.type))
            table = table.set_column(i, field.with_type(target), column)
    return table


def conform_schema(got: pa.Schema, expected: pa.Schema) -> pa.Schema | None:
    """`got` as `conform` makes a result of it, if that is `expected` (else None)."""
    made = conform(got.empty_table(), expected).schema
    try:
        check_schema(made, expected)
    except SchemaMismatch:
        return None
    return made


CONFORM = "SchemaConform"  # a result that conform would make fit: computed again, given the schema
UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu", "UCT", "Etc/UCT"})


@functools.lru_cache(maxsize=256)
def _as_stored(kind: pa.DataType) -> pa.DataType:
    """`kind` as a Parquet file gives it back (pyarrow's own round trip, asked: not a list of
    its rules), with any name of UTC as "UTC"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    try:
        pq.write_table(pa.schema([("c", kind)]).empty_table(), sink)
        kind = pq.read_schema(pa.BufferReader(sink.getvalue())).field("c").type
    except (pa.ArrowException, ValueError):  # not a type Parquet holds: writing the part says so
        return kind
    return _utc(kind)


def _utc(kind: pa.DataType) -> pa.DataType:
    """Any name of UTC as "UTC", also inside lists, structs and maps."""
    import pyarrow as pa

    if pa.types.is_timestamp(kind) and kind.tz in UTC_NAMES:
        return pa.timestamp(kind.unit, "UTC")
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_utc(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_utc(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_utc(field.type)) for field in kind])
    if pa.types.is_map(kind):
        return pa.map_(_utc(kind.key_type), _utc(kind.item_type))
    return kind


def inspect_part(path: Path, chunk_id: str, definition: str | None) -> int:
    """Rows of a part about to be adopted; raises ValueError unless its footer reads and names
    this chunk and this job definition. A part that names neither (an older release wrote it)
    is not adopted either: computing a chunk again is the safe direction."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
    except Exception as exc:  # truncated, not Parquet, unreadable: not a result we can trust
        raise ValueError(f"unreadable footer: {type(exc).__name__}: {exc}") from None
    keys = metadata.metadata or {}
    if CHUNK_KEY not in keys or DEFINITION_KEY not in keys:
        raise ValueError("its footer does not say which chunk and definition it holds")
    if keys[CHUNK_KEY] != chunk_id.encode():
        raise ValueError("written for another chunk")
    if keys[DEFINITION_KEY] != (definition or "").encode():
        raise ValueError("written by another definition of the job")
    return int(metadata.num_rows)


def input_signature_of(path: Path) -> str | None:
    """The job's input schema (JSON) a part was computed under, as its footer says."""
    import pyarrow.parquet as pq

    try:
        value = (pq.read_metadata(path).metadata or {}).get(INPUT_KEY)
    except Exception:
        return None
    return value.decode() if value else None


def read_schema(path: Path) -> pa.Schema:
    import pyarrow.parquet as pq

    return pq.read_schema(path).remove_metadata()


class SchemaGate(Generic[T]):
    """Decides the output schema in plan order, never by which worker finished first.

    The schema is that of the first chunk, in plan order, whose result has rows. Until every
    chunk planned before a result has an outcome, that result waits (staged, unpublished);
    `offer` and `resolve` return the results that may go on, in plan order.
    """

    def __init__(self, schema: pa.Schema | None, order: Iterable[str]) -> None:
        self.schema = schema
        self._index = {chunk_id: i for i, chunk_id in enumerate(order)}
        self._outcomes: dict[int, pa.Schema | None] = {}  # plan index -> its rows' schema
        self._held: dict[int, T] = {}
        self._next = 0  # the first plan index without an outcome
        self._fallback: pa.Schema | None = None  # the first schema with a `null`-typed column

    @property
    def waiting(self) -> list[T]:
        return [self._held[i] for i in sorted(self._held)]

    def offer(self, chunk_id: str, schema: pa.Schema | None, item: T) -> list[T]:
        """A finished chunk; `schema` is None when its result has no rows (nothing to publish)."""
        if schema is None:
            return [item, *self.resolve(chunk_id)]
        if self.schema is not None:
            return [item]
        index = self._index[chunk_id]
        self._outcomes[index] = schema
        self._held[index] = item
        return self._advance()

    def resolve(self, chunk_id: str) -> list[T]:
        """A chunk that ended without rows: no rows, dead-lettered, or its input changed."""
        if self.schema is not None or chunk_id not in self._index:
            return []
        self._outcomes.setdefault(self._index[chunk_id], None)
        return self._advance()

    def _advance(self) -> list[T]:
        while self._next in self._outcomes:
            schema = self._outcomes[self._next]
            if schema is not None and not _has_null_type(schema):
                return self._decide(schema)
            self._fallback = self._fallback or schema  # all-null columns: Arrow typed them `null`
            self._next += 1
        if self._next == len(self._index) and self._fallback is not None:
            return self._decide(self._fallback)  # nothing better came
        return []

    def _decide(self, schema: pa.Schema) -> list[T]:
        self.schema = schema
        released, self._held = self.waiting, {}
        return released


def _has_null_type(schema: pa.Schema) -> bool:
    import pyarrow as pa

    return any(pa.types.is_null(field.type) for field in schema)


def _discard(result: TaskResult) -> None:
    """Remove what a worker staged for a result that is not published."""
    for path in filter(None, (result.staged, result.quarantine_staged, result.malformed_staged)):
        Path(path).unlink(missing_ok=True)
