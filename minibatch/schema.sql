-- The manifest's schema. Column meanings are documented in README.md ("The manifest").
CREATE TABLE IF NOT EXISTS runs (
    run_id         VARCHAR PRIMARY KEY,
    job            VARCHAR NOT NULL,
    pid            INTEGER,
    started_at     TIMESTAMPTZ NOT NULL,
    status         VARCHAR NOT NULL,   -- running | succeeded | failed | stopped | crashed
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
    status         VARCHAR NOT NULL,   -- done | dead
    run_id         VARCHAR NOT NULL,
    attempts       INTEGER NOT NULL,
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

-- The daemon's schedule: the last time each job was fired, for catch-up after downtime.
CREATE TABLE IF NOT EXISTS schedule_state (
    job            VARCHAR PRIMARY KEY,
    last_fire_at   TIMESTAMPTZ NOT NULL
);

-- What each reduce job's published output was built from (reduce_sql and the part files).
CREATE TABLE IF NOT EXISTS reduce_state (
    job            VARCHAR PRIMARY KEY,
    parts_key      VARCHAR NOT NULL,
    reduced_at     TIMESTAMPTZ
);
