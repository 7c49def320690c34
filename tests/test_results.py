"""The result store's pure parts (minibatch/results.py): the plan-order schema decision,
the footer check before adoption, and which files are minibatch's to delete."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minibatch.layout import OutputLayout, part_name, with_provenance
from minibatch.owner import OutputNotOwned
from minibatch.results import SchemaGate, inspect_part

A = pa.schema([("id", pa.int64())])
B = pa.schema([("x", pa.string())])
ORDER = ["c0", "c1", "c2", "c3"]


def test_the_first_chunk_in_plan_order_decides_whatever_finishes_first() -> None:
    gate: SchemaGate[str] = SchemaGate(None, ORDER)
    assert gate.offer("c2", B, "r2") == []  # finished first, but waits for c0 and c1
    assert gate.offer("c1", A, "r1") == []
    assert gate.schema is None
    assert gate.offer("c0", A, "r0") == ["r0", "r1", "r2"]  # plan order; r2 will be rejected
    assert gate.schema == A
    assert gate.offer("c3", B, "r3") == ["r3"]  # decided: no more waiting


def test_chunks_without_rows_dead_or_changed_pass_the_decision_on() -> None:
    gate: SchemaGate[str] = SchemaGate(None, ORDER)
    assert gate.offer("c2", B, "r2") == []
    assert gate.offer("c0", None, "empty") == ["empty"]  # nothing to publish: goes on at once
    assert gate.resolve("c1") == ["r2"]  # dead-lettered: the next chunk in order decides
    assert gate.schema == B


def test_a_known_schema_lets_everything_through() -> None:
    gate: SchemaGate[str] = SchemaGate(A, ORDER)
    assert gate.offer("c3", B, "r3") == ["r3"]
    assert gate.resolve("c0") == []


def test_results_still_waiting_are_listed_for_a_stop() -> None:
    gate: SchemaGate[str] = SchemaGate(None, ORDER)
    gate.offer("c3", A, "r3")
    gate.offer("c1", A, "r1")
    assert gate.waiting == ["r1", "r3"]


def write_part(path: Path, chunk_id: str, definition: str | None) -> Path:
    pq.write_table(with_provenance(pa.table({"id": [1, 2, 3]}), chunk_id, definition), path)
    return path


def test_inspect_part_checks_footer_chunk_and_definition(tmp_path: Path) -> None:
    part = write_part(tmp_path / "p.parquet", "c" * 24, "def1")
    assert inspect_part(part, "c" * 24, "def1") == 3
    with pytest.raises(ValueError, match="another chunk"):
        inspect_part(part, "d" * 24, "def1")
    with pytest.raises(ValueError, match="another definition"):
        inspect_part(part, "c" * 24, "def2")
    truncated = tmp_path / "t.parquet"
    truncated.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(ValueError, match="unreadable footer"):
        inspect_part(truncated, "c" * 24, "def1")


def test_only_minibatch_names_are_parts_and_foreign_files_stay(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path / "out", reduce=False)
    layout.prepare()
    ours = part_name("a" * 24)
    for name in (ours, "foreign.parquet", "NOTES.txt", "part-00000-spark.parquet"):
        (layout.output / name).write_bytes(b"x")
    assert layout.part_files() == {ours}
    assert layout.foreign_files() == ["NOTES.txt", "foreign.parquet", "part-00000-spark.parquet"]
    layout.remove_all()
    assert sorted(p.name for p in layout.output.iterdir()) == layout.foreign_files()
    assert layout.staging.is_dir()  # the claim stays with the user's files: the next run is not refused


def test_claim_refuses_a_directory_minibatch_did_not_create(tmp_path: Path) -> None:
    OutputLayout(tmp_path / "absent", reduce=False).claim("j", tmp_path)  # absent: fine
    (tmp_path / "empty").mkdir()
    OutputLayout(tmp_path / "empty", reduce=False).claim("j", tmp_path)  # empty: fine
    layout = OutputLayout(tmp_path / "out", reduce=False)
    layout.output.mkdir()
    (layout.output / part_name("b" * 24)).write_bytes(b"x")
    layout.claim("j", tmp_path)  # only what minibatch names its files: an older release's output
    layout.remove_all()  # the claim goes with it
    layout.output.mkdir()
    (layout.output / "keep.txt").write_text("mine")
    with pytest.raises(OutputNotOwned, match="not created by minibatch"):
        layout.claim("j", tmp_path)
    assert not layout.staging.exists()  # refused: nothing written
    layout.staging.mkdir()  # the staging directory beside it is minibatch's claim
    layout.claim("j", tmp_path)
    with pytest.raises(OutputNotOwned, match=r"is the output of j, not of j\[date=2026-11-01\]"):
        layout.claim("j[date=2026-11-01]", tmp_path)  # one output, one owner
    with pytest.raises(OutputNotOwned, match="inside the output"):
        OutputLayout(layout.output / "nested", reduce=False).claim("k", tmp_path)


def test_an_empty_owner_file_is_no_claim(tmp_path: Path) -> None:
    """A crash right after creating the owner file (before its bytes reached the disk) leaves
    it empty: the next claim takes the output as its own, it is not locked out."""
    layout = OutputLayout(tmp_path / "out", reduce=False)
    layout.staging.mkdir(parents=True)
    (layout.staging / "minibatch-owner").write_text("")
    layout.claim("daily", tmp_path)
    assert layout.owner() == "daily" and sorted(p.name for p in layout.staging.iterdir()) == [
        "minibatch-owner"
    ]


def test_an_owner_file_of_an_older_release_gains_the_state_dir(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path / "out", reduce=False)
    layout.staging.mkdir(parents=True)
    (layout.staging / "minibatch-owner").write_text("daily")  # the job's name only
    layout.claim("daily", tmp_path / "state")
    with pytest.raises(OutputNotOwned, match="with the state_dir"):
        layout.claim("daily", tmp_path / "another")
    state = (tmp_path / "state" / "minibatch-id").read_text()
    record = f"daily\n{state}\n{tmp_path / 'state'}"  # job, state_dir id and path
    assert (layout.staging / "minibatch-owner").read_text() == record


def test_of_two_first_claims_at_once_one_wins(tmp_path: Path) -> None:
    import threading

    for trial in range(40):
        output = tmp_path / f"out{trial}"
        results: dict[str, str] = {}

        def claim(owner: str, output: Path = output, results: dict[str, str] = results) -> None:
            try:
                OutputLayout(output, reduce=False).claim(owner, tmp_path)
                results[owner] = "owner"
            except OutputNotOwned:
                results[owner] = "refused"

        threads = [threading.Thread(target=claim, args=(name,)) for name in ("europe", "regional[region=eu]")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results.values()) == ["owner", "refused"], results


def test_a_leftover_that_cannot_be_removed_does_not_block_the_next_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a unit staged by an earlier run that this run's user could not remove (another
    user's directory in it) made every later run fail with 'File exists' on its name."""
    from minibatch import userfiles

    leftover = tmp_path / "unit-abc"
    (leftover / "theirs").mkdir(parents=True)
    monkeypatch.setattr(userfiles, "remove_tree", lambda path: None)  # as if not permitted
    fresh = userfiles.fresh_dir(leftover)
    assert fresh == tmp_path / "unit-abc-1" and list(fresh.iterdir()) == []
    assert (leftover / "theirs").is_dir()
