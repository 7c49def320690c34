"""What is left to do: the plan held against the manifest and the output directory.

Before anything runs, a run (1) forgets results of another definition of the job, (2) turns
files that do not fit the job's input schema into bad files, and (3) compares the planned
chunks with the manifest and the parts on disk: records of chunks no longer planned, or
whose part is gone, are forgotten; parts a killed run published but did not record are
adopted; results it staged but did not publish are salvaged; parts nobody owns are removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minibatch.events import RunEvents
from minibatch.inputs import Inputs
from minibatch.jobcode import changed_facts, definition
from minibatch.layout import OutputLayout, part_name, vacant
from minibatch.ledger import Ledger
from minibatch.manifest import Manifest
from minibatch.planner import BadFile, Chunk, FileMeta, Signature, input_signature, misfits, typeless
from minibatch.records import fingerprint_stat
from minibatch.results import ResultStore
from minibatch.states import ChunkStatus, EventKind
from minibatch.tasks import TaskResult
from minibatch.textinput import text_facts

if TYPE_CHECKING:
    from minibatch.config import JobConfig


@dataclass
class Definition:
    key: str
    facts: dict[str, Any]
    changed: list[str] = field(default_factory=list)  # what changed since the last run, if it did


def job_definition(job: JobConfig, base_dir: Path) -> Definition:
    """What the job's results are of: its code, and beyond it how parts are written (whole where
    reduce_sql reads them), its checks, its text format."""
    facts = job.shape.of_parts(job.reduce_sql).facts() | job.checks.facts(job.output) | text_facts(job.text)
    return Definition(*definition(job.process, job.sql, job.columns, job.version, base_dir, facts))


def check_definition(
    manifest: Manifest, job: str, definition: Definition, events: RunEvents
) -> dict[str, Any]:
    """Results of another definition of the job (sql, process or its source, columns, version)
    are not current: forget them, so that this run computes them again. Returns the job's
    state as the manifest holds it now."""
    state = manifest.job_state(job) or {}
    stored = state.get("definition")
    changed = stored is not None and stored != definition.key
    if changed:
        definition.changed = changed_facts(state.get("definition_facts"), definition.facts) or ["definition"]
        events(EventKind.DEFINITION_CHANGED, changed=definition.changed)
    if changed or stored is None:
        facts = json.dumps(definition.facts, sort_keys=True)
        manifest.set_definition(job, definition.key, facts, forget=changed)
    return manifest.job_state(job) or {}


@dataclass
class Fit:
    good: list[FileMeta]
    bad: list[BadFile]
    signature: str | None  # the job's input schema, JSON
    stuck: bool = False  # kept for an unreadable input while no readable one has it: bad files fail every run


def fit_schema(
    manifest: Manifest,
    job: str,
    stored_json: str | None,
    files: list[FileMeta],
    columns: tuple[str, ...] | None,
    unreadable: bool = False,
    declared: bool = False,
) -> Fit:
    """Files whose columns differ from the job's input schema are bad files. The schema is the
    one earlier runs stored (or, after `repair`, the one the output's parts name) while any
    input still has it, else the one most files have; it is stored from now on. (A schema no
    input has any more, after every file was rewritten or a `schema` was declared, would make
    them all bad files: an empty output, and later runs succeeding over it.) Not while some
    input cannot be read, known bad or new, unless the job declares its `schema`: it may be one
    of those that have the stored schema (a copy cut short stays so for runs), and taking
    another would make them bad for good. Then the misfits fail every run (`stuck`), not only
    the first: else later runs succeed over them."""
    stored: Signature | None = tuple((n, t) for n, t in json.loads(stored_json)) if stored_json else None
    typed = [meta for meta in files if not typeless(meta)]  # (a CSV's header alone fits any)
    stale = bool(stored and typed and all(misfits(meta, stored, columns) for meta in typed))
    if stale and (declared or not unreadable):  # a declared `schema` is the schema, whatever else
        stored = None
    kept = stale and stored is not None
    signature = input_signature(files, stored)
    if signature is None:
        return Fit(files, [], None)
    if stored is None:
        manifest.set_schemas(job, json.dumps(signature), None)
    good, bad = [], []
    for meta in files:
        problem = misfits(meta, signature, columns)
        if problem is None:
            good.append(meta)
        else:
            why = "; kept while an input cannot be read: fix or remove it" if kept else ""
            bad.append(BadFile(meta.path, meta.fingerprint, meta.size, problem + why))
    return Fit(good, bad, json.dumps(signature), stuck=kept)


def report_bad_files(
    manifest: Manifest,
    job: str,
    run_id: str,
    bad: list[BadFile],
    events: RunEvents,
    failing: Sequence[BadFile] = (),
) -> list[BadFile]:
    """Log every bad file; record the new ones (a known one fails no run again). Returns those,
    and the `failing` ones, which fail every run and are not recorded."""
    known = manifest.known_bad_files(job)
    new = [b for b in bad if (b.path, b.fingerprint) not in known or b in failing]
    for item in bad:
        kind = EventKind.BAD_FILE if item in new else EventKind.KNOWN_BAD_FILE
        events(kind, file=item.path, error=item.error)
    if recorded := [b for b in new if b not in failing]:
        manifest.record_bad_files(job, run_id, recorded)
    return new


@dataclass
class Reconciled:
    todo: list[Chunk]
    salvaged: list[tuple[Chunk, TaskResult]]
    skipped: int  # dead letters of earlier runs, not retried
    planned: list[Chunk]  # every chunk of the plan


def reconcile(
    chunks: list[Chunk], manifest: Manifest, store: ResultStore, ledger: Ledger, events: RunEvents
) -> Reconciled:
    """Chunks still to compute, and finished results found on disk (see the module's doc)."""
    job = ledger.record.job
    states = manifest.chunk_states(job)
    sizes = store.layout.part_sizes()
    on_disk = set(sizes)
    # a part not of the size it was written (cut short, another's copied over it) is checked
    # as one found on disk is, by its footer, below
    written = {row["output_file"]: row["bytes_out"] for row in manifest.named("part_sizes", job=job)}
    planned = {c.chunk_id for c in chunks}
    unverified = bool(manifest.named("unverified_parts", job=job))  # restored: checked by footer, once
    done = {
        chunk_id: output
        for chunk_id, (status, output) in states.items()
        if status == ChunkStatus.DONE
        and chunk_id in planned
        and (
            output is None
            or (not unverified and output in on_disk and written.get(output, sizes[output]) == sizes[output])
        )
    }
    dead = {
        chunk_id
        for chunk_id, (status, _) in states.items()
        if status == ChunkStatus.DEAD and chunk_id in planned
    }
    taken = (
        manifest.named("take_over_dead", job=job, run_id=ledger.record.run_id, ids=list(dead)) if dead else []
    )
    ledger.inherit(taken)
    forget = [chunk_id for chunk_id in states if chunk_id not in done and chunk_id not in dead]
    manifest.forget_chunks(job, forget)
    if unverified:  # (forgotten first: a crash between leaves them to be footer-checked anyway)
        manifest.named("verified_parts", job=job)
    ledger.reused(done)
    orphans = [c for c in chunks if c.chunk_id not in done.keys() | dead and part_name(c.chunk_id) in on_disk]
    for part in store.adopt(orphans):
        ledger.adopted(part.chunk, part.name, part.rows, part.nbytes)
    removed = store.remove_strays(on_disk, ledger.outputs)
    if removed or forget:
        events(EventKind.STALE_OUTPUTS_REMOVED, files=removed, records=len(forget))
    if dead:
        events(EventKind.DEAD_LETTERS_SKIPPED, chunks=len(dead), hint=f"minibatch retry {job}")
    if foreign := store.layout.foreign_files():
        events(EventKind.FOREIGN_FILES_IN_OUTPUT, output=str(store.layout.output), files=foreign[:10])
    todo = [c for c in chunks if c.chunk_id not in dead and c.chunk_id not in ledger.outputs]
    if len({c.path for c in todo}) > 1:  # (files to put in an order: not a quiet run's none, or one)
        ids = [c.chunk_id for c in chunks]
        failed = {r["chunk_id"] for r in manifest.named("failed_before", job=job.partition("[")[0], ids=ids)}
        files = {c.path for c in chunks if c.chunk_id in failed}  # a file's chunks, all (bad rows spread)
        todo.sort(key=lambda chunk: chunk.path in files)  # (stable: plan order otherwise)
    return Reconciled(todo, store.salvage(todo), len(dead) - len(taken), chunks)  # taken: this run's


def results_lost(manifest: Manifest, job: JobConfig, layout: OutputLayout, fresh: bool) -> str | None:
    """Why the results recorded done cannot be where they were written, none of them (a share
    not mounted, a directory moved or deleted: written anew, they would fill another disk). Not
    where the config moved them (another output, a shape with a hidden parts directory) while
    the place of the last run that could write still holds them."""
    if fresh or not layout.vacant():
        return None
    (found,) = manifest.named("results_recorded", key=job.key, done=ChunkStatus.DONE)
    done = found["n"]
    written = Path(found["parts_dir"] or layout.parts)  # (None: only runs of an older release)
    if not done or not vacant(written):  # (written elsewhere: a symlink on a share resolved anew)
        return None
    where = f"the parts directory {layout.parts} of output" if layout.hidden else "output"
    return (
        f"{where} {layout.output} holds none of the {done:,} results recorded done (a share not mounted, "
        f"a directory moved or deleted?): put it back and run again, or compute them anew with "
        f"`minibatch run-now {job.name}{''.join(f' --param {k}={v}' for k, v in job.values)} --fresh`"
    )


def drop_removed(
    chunks: list[Chunk], removed: set[str], store: ResultStore, ledger: Ledger, events: RunEvents
) -> int:
    """Input files removed under the run take their results with them, earlier runs' too (the
    next plan would drop them as well): the output never holds part of a file that is no longer
    input. Returns how many planned chunks that leaves out."""
    ids = [c.chunk_id for c in chunks if c.path in removed]
    names = {ledger.outputs.pop(chunk_id, None) for chunk_id in ids}
    ledger.flush()  # this run's records of them first: forgetting them is the last word
    ledger.manifest.forget_chunks(ledger.record.job, ids)
    files = store.remove_strays({name for name in names if name}, ledger.outputs)
    events(EventKind.STALE_OUTPUTS_REMOVED, files=files, records=len(ids))
    return len(ids)


def removed_and_changed(
    changed: set[str], removed: set[str], planned: set[str], now: Inputs
) -> tuple[set[str], set[str]]:
    """(input files removed under the run, whose results go too; files changed under it). A
    removed file whose name is back (a dangling symlink too: a share gone away) is changed; so is
    every removed one when the globs now match a file the plan did not name (renamed, or another
    path to the same file): its results may still be input."""
    moved = bool(set(now.files) - planned or now.unreadable)
    back = {path for path in removed if moved or os.path.lexists(path)}
    return removed - back, changed | back


def earlier_inputs(
    manifest: Manifest, key: str, fresh: bool
) -> tuple[dict[str, set[tuple[int, int]]], dict[str, str] | None]:
    """The input files of the job's recorded chunks with their (size, mtime_ns), and the mount
    points above the inputs of its latest run that read them (None for a `fresh` run: it
    computes their results anew, wherever they come from now; or where no run recorded them)."""
    rows = manifest.named("input_files", key=key)
    files = {row["file"]: {fingerprint_stat(fp) for fp in row["prints"]} for row in rows}
    mounts = [] if fresh else [json.loads(row["mounts"]) for row in manifest.named("input_mounts", key=key)]
    return files, next((m for m in mounts if isinstance(m, dict)), None)  # (a list: a pre-release's)


def inputs_read(manifest: Manifest, key: str | None) -> tuple[tuple[str, int, int], ...]:
    """What the job's recorded chunks (and bad files) read, as `inputs.input_signature` says it:
    a daemon's `watch` starts from it, so that files which came while no daemon ran fire too. A
    file without rows is recorded nowhere: it fires once at each daemon's start."""
    if key is None:
        return ()
    files = earlier_inputs(manifest, key, fresh=True)[0]
    for path, fingerprint in manifest.known_bad_files(key):  # read, found bad: no chunk records them
        files.setdefault(path, set()).add(fingerprint_stat(fingerprint))
    return tuple(sorted((path, *stamp) for path, stamps in files.items() for stamp in stamps))
