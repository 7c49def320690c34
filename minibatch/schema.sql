-- The manifest's schema. Column meanings are documented in README.md ("The manifest").
CREATE TABLE IF NOT EXISTS runs (
    run_id         VARCHAR PRIMARY KEY,
    job            VARCHAR NOT NULL,
    pid            INTEGER,
    started_at     TIMESTAMPTZ NOT NULL,
    status         VARCHAR NOT NULL    -- states.RunStatus
                   CHECK (status IN ('running', 'succeeded', 'failed', 'stopped', 'crashed')),
    ended_at       TIMESTAMPTZ,
    chunks_total   INTEGER,            -- chunks in this run's plan
    chunks_done    INTEGER,            -- computed by this run
    chunks_reused  INTEGER,            -- already done by earlier runs
    chunks_dead    INTEGER,            -- dead-lettered by this run
    chunks_skipped INTEGER,            -- dead letters of earlier runs, skipped
    bad_files      INTEGER,
    rows_in        BIGINT,
    rows_out       BIGINT,
    bytes_in       BIGINT,
    bytes_out      BIGINT,
    error          VARCHAR
);

CREATE TABLE IF NOT EXISTS chunks (
    job            VARCHAR NOT NULL,
    chunk_id       VARCHAR NOT NULL,   -- hash of file, fingerprint and row range
    file           VARCHAR NOT NULL,
    fingerprint    VARCHAR NOT NULL,   -- size-mtime_ns-footer hash
    row_start      BIGINT NOT NULL,
    row_end        BIGINT NOT NULL,
    status         VARCHAR NOT NULL    -- states.ChunkStatus
                   CHECK (status IN ('done', 'dead')),
    run_id         VARCHAR NOT NULL,
    attempts       INTEGER NOT NULL,   -- 0: staged by a killed run, published by this one
    rows_in        BIGINT,
    rows_out       BIGINT,
    bytes_in       BIGINT,
    bytes_out      BIGINT,
    output_file    VARCHAR,            -- name inside the output (or parts) directory; NULL: no rows
    seconds        DOUBLE,
    finished_at    TIMESTAMPTZ,
    error_type     VARCHAR,
    error_message  VARCHAR,
    traceback      VARCHAR,
    PRIMARY KEY (job, chunk_id)
);

CREATE TABLE IF NOT EXISTS bad_files (
    job            VARCHAR NOT NULL,
    file           VARCHAR NOT NULL,
    fingerprint    VARCHAR NOT NULL,
    size           BIGINT,
    error          VARCHAR,
    run_id         VARCHAR,
    seen_at        TIMESTAMPTZ,
    PRIMARY KEY (job, file, fingerprint)
);

-- Every attempt at a chunk, with where its time went: what `history` and `report` show.
CREATE TABLE IF NOT EXISTS attempts (
    job             VARCHAR NOT NULL,
    run_id          VARCHAR NOT NULL,
    chunk_id        VARCHAR NOT NULL,
    attempt         INTEGER NOT NULL,  -- 1, 2, ... within the run
    label           VARCHAR,           -- file[row_start:row_end]
    slot            INTEGER,           -- worker slot, 0 .. workers-1
    pid             INTEGER,           -- worker process
    admitted_at     TIMESTAMPTZ,       -- reserved in the memory budget and sent to a worker
    started_at      TIMESTAMPTZ,
    ended_at        TIMESTAMPTZ,
    read_seconds    DOUBLE,            -- sql jobs: DuckDB reads while it computes; counted there
    compute_seconds DOUBLE,
    write_seconds   DOUBLE,
    rows_in         BIGINT,
    rows_out        BIGINT,
    bytes_in        BIGINT,            -- uncompressed
    bytes_out       BIGINT,            -- Parquet written
    reserved_bytes  BIGINT,            -- the chunk's share of the memory budget
    peak_rss        BIGINT,            -- the worker's peak resident memory during the attempt
    outcome         VARCHAR NOT NULL   -- states.Outcome
                    CHECK (outcome IN ('done', 'retried', 'dead', 'input_changed')),
    error_type      VARCHAR,
    error_message   VARCHAR,
    traceback       VARCHAR,
    PRIMARY KEY (run_id, chunk_id, attempt)
);

-- Columns added after the first release: older manifests gain them on open.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS workers INTEGER;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS memory_limit BIGINT;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS peak_in_flight BIGINT;  -- budget bytes reserved, at most
ALTER TABLE runs ADD COLUMN IF NOT EXISTS busy_seconds DOUBLE;    -- sum of attempts' durations
ALTER TABLE runs ADD COLUMN IF NOT EXISTS utilisation DOUBLE;     -- busy / (workers x wall time)
ALTER TABLE runs ADD COLUMN IF NOT EXISTS rows_per_second DOUBLE; -- rows_in / wall time
ALTER TABLE runs ADD COLUMN IF NOT EXISTS mb_per_second DOUBLE;   -- bytes_in / 1e6 / wall time
ALTER TABLE runs ADD COLUMN IF NOT EXISTS settings VARCHAR;       -- the job's config, JSON
ALTER TABLE runs ADD COLUMN IF NOT EXISTS rows_bad BIGINT DEFAULT 0; -- dropped or quarantined by checks
ALTER TABLE chunks ADD COLUMN IF NOT EXISTS rows_bad BIGINT DEFAULT 0; -- the same, per chunk
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS start_rss BIGINT;   -- the worker's, when it started
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS chunk_bytes BIGINT; -- the planner's size of the chunk
ALTER TABLE runs ADD COLUMN IF NOT EXISTS peak_memory BIGINT;    -- measured above idle_memory
ALTER TABLE runs ADD COLUMN IF NOT EXISTS idle_memory BIGINT;    -- measured, before the first chunk
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS cpu_seconds DOUBLE; -- the worker's CPU time in it
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS queued_seconds DOUBLE; -- runnable, waiting for a CPU
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS chunk_size BIGINT;  -- estimated size in Arrow
ALTER TABLE runs ADD COLUMN IF NOT EXISTS params VARCHAR;         -- JSON {name: value}; job is job[k=v]
ALTER TABLE runs ADD COLUMN IF NOT EXISTS parts_dir VARCHAR;      -- where its chunk results go
ALTER TABLE runs ADD COLUMN IF NOT EXISTS mounts VARCHAR;         -- JSON: mount points above its inputs
ALTER TABLE runs ADD COLUMN IF NOT EXISTS seq BIGINT;            -- the order runs were recorded in

-- Backfills (backfill.py): one row each, and one per logical date it covers.
CREATE TABLE IF NOT EXISTS backfills (
    backfill_id    VARCHAR PRIMARY KEY,
    job            VARCHAR NOT NULL,
    first_date     DATE NOT NULL,
    last_date      DATE NOT NULL,
    params         VARCHAR NOT NULL,   -- JSON: the other parameters, as given
    reprocess      VARCHAR NOT NULL,   -- none | failed | all
    max_parallel   INTEGER NOT NULL,
    backwards      BOOLEAN NOT NULL,
    status         VARCHAR NOT NULL,   -- running | succeeded | failed | stopped | superseded
    pid            INTEGER,
    created_at     TIMESTAMPTZ,
    ended_at       TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS backfill_dates (
    backfill_id    VARCHAR NOT NULL,
    logical_date   DATE NOT NULL,
    position       INTEGER NOT NULL,   -- the order they run in (--backwards: newest first)
    action         VARCHAR NOT NULL,   -- run | fresh (reprocess from scratch) | skip
    status         VARCHAR NOT NULL,   -- pending | running | succeeded | failed | stopped | skipped
    run_id         VARCHAR,
    error          VARCHAR,
    updated_at     TIMESTAMPTZ,
    PRIMARY KEY (backfill_id, logical_date)
);

-- Jobs whose schedule is paused (`minibatch pause`, POST /jobs/{job}/pause); kept across restarts.
CREATE TABLE IF NOT EXISTS paused_jobs (
    job            VARCHAR PRIMARY KEY,
    paused_at      TIMESTAMPTZ NOT NULL
);

-- The daemon's schedule: the last time each job was fired, for catch-up after downtime.
CREATE TABLE IF NOT EXISTS schedule_state (
    job            VARCHAR PRIMARY KEY,
    last_fire_at   TIMESTAMPTZ NOT NULL
);

-- Fires waiting for their dependencies (`depends_on`), one per job and parameter set: a
-- restarted daemon waits on with them (a dated fire lost would leave its date never run).
CREATE TABLE IF NOT EXISTS waiting_fires (
    job            VARCHAR NOT NULL,
    params         VARCHAR NOT NULL,
    fired_at       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job, params)
);

-- What each reduce job's published output was built from (reduce_sql and the part files).
CREATE TABLE IF NOT EXISTS reduce_state (
    job            VARCHAR PRIMARY KEY,
    parts_key      VARCHAR NOT NULL,
    reduced_at     TIMESTAMPTZ
);

-- Per job: the definition its results were computed with, and the schemas decided for it.
CREATE TABLE IF NOT EXISTS job_state (
    job              VARCHAR PRIMARY KEY,
    definition       VARCHAR,          -- hash of process, sql, columns, version (or module source)
    definition_facts VARCHAR,          -- JSON: what that hash was made of
    input_schema     VARCHAR,          -- JSON [[column, Arrow type], ...]: files that differ are bad
    output_schema    BLOB,             -- Arrow IPC: every part has it
    updated_at       TIMESTAMPTZ
);

-- Jobs whose results on disk a restored manifest may not describe (another definition's,
-- computed after the backup): the next run checks each part's footer before it counts as done.
CREATE TABLE IF NOT EXISTS unverified_parts (
    job            VARCHAR PRIMARY KEY
);

-- Rows that failed each row-level check, per run (a row counts once for each check it fails).
CREATE TABLE IF NOT EXISTS check_counts (
    job            VARCHAR NOT NULL,
    run_id         VARCHAR NOT NULL,
    check_name     VARCHAR NOT NULL,
    action         VARCHAR NOT NULL CHECK (action IN ('warn', 'drop', 'quarantine', 'fail')),
    rows_failed    BIGINT NOT NULL,
    PRIMARY KEY (run_id, check_name)
);
