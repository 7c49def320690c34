-- Every query minibatch runs on the manifest, by name (loaded by manifest.py).
-- Parameters only: nothing from a job name or a file name is ever pasted into SQL.
-- Statuses are bound as parameters from minibatch/states.py.

-- name: sequence_run
-- Runs are ordered by when they were recorded, not by their clock times: a clock set back (NTP,
-- a restored VM) must not make a run the latest that is not (runs of older releases: no seq).
UPDATE runs SET seq = (SELECT coalesce(max(seq), 0) + 1 FROM runs) WHERE run_id = $run_id;

-- name: mark_crashed
-- A run still `running` when the next one of its job starts has crashed.
UPDATE runs SET status = $crashed, ended_at = now() WHERE job = $job AND status = $running;

-- name: chunk_states
SELECT chunk_id, status, output_file FROM chunks WHERE job = $job;

-- name: part_sizes
-- The size each result file recorded done was written with.
SELECT output_file, bytes_out FROM chunks WHERE job = $job AND output_file IS NOT NULL;

-- name: unverify_parts
-- (and what each published reduction was built from: the parts may be the backup's, the
-- published result another definition's; its rows stay, for output_rows_change)
-- Every job with a run or a chunk: one whose chunks had no rows (or no inputs) may have rows now.
INSERT OR IGNORE INTO unverified_parts SELECT job FROM chunks UNION SELECT job FROM runs;
UPDATE reduce_state SET parts_key = 'restored' || substr(parts_key, strpos(parts_key, '#'));

-- name: all_unverified_parts
SELECT job FROM unverified_parts;

-- name: unverified_parts
SELECT job FROM unverified_parts WHERE job = $job;

-- name: verified_parts
DELETE FROM unverified_parts WHERE job = $job;

-- name: forget_chunks
DELETE FROM chunks WHERE job = $job AND chunk_id IN (SELECT unnest($ids::VARCHAR[]));

-- name: count_dead
SELECT count(*) FROM chunks WHERE job = $job AND status = $dead;

-- name: forget_dead
DELETE FROM chunks WHERE job = $job AND status = $dead;

-- name: forget_bad_files
DELETE FROM bad_files WHERE job = $job;

-- name: known_bad_files
-- Known: reported by a run that ended (failed, or succeeded before it turned bad); one found by
-- a run stopped, crashed or killed (still `running`) is reported again by the next.
SELECT file, fingerprint FROM bad_files WHERE job = $job
AND run_id NOT IN (SELECT run_id FROM runs WHERE status IN ('stopped', 'crashed', 'running'));

-- name: failed_before
-- Of these chunks (a plan's), those an attempt of an earlier run failed (retried or dead-lettered):
-- their files go last, so that a file whose chunks all fail (tripping the circuit breaker first
-- thing, run after run) starves no other.
SELECT DISTINCT chunk_id FROM attempts
WHERE job = $job AND outcome IN ('retried', 'dead') AND chunk_id IN (SELECT unnest($ids::VARCHAR[]));

-- name: take_over_dead
-- Dead letters of a run that never failed for them (stopped, crashed, or killed while
-- `running`): this run reports them, and they are its own from now on.
UPDATE chunks SET run_id = $run_id
WHERE job = $job AND status = 'dead' AND run_id <> $run_id AND chunk_id IN (SELECT unnest($ids::VARCHAR[]))
AND run_id IN (SELECT run_id FROM runs WHERE status IN ('stopped', 'crashed', 'running'))
RETURNING chunk_id, file, fingerprint, row_start, row_end, attempts, error_type, error_message, traceback;

-- name: record_bad_file
INSERT OR REPLACE INTO bad_files (job, file, fingerprint, size, error, run_id, seen_at)
VALUES ($job, $file, $fingerprint, $size, $error, $run_id, now());

-- name: reset_chunks
DELETE FROM chunks WHERE job = $job;

-- name: reset_reduce
DELETE FROM reduce_state WHERE job = $job;

-- name: reset_job_state
DELETE FROM job_state WHERE job = $job;

-- name: clear_output_schema
UPDATE job_state SET output_schema = NULL WHERE job = $job;

-- name: job_state
SELECT * FROM job_state WHERE job = $job;

-- name: set_definition
INSERT INTO job_state (job, definition, definition_facts, updated_at)
VALUES ($job, $definition, $facts, now())
ON CONFLICT (job) DO UPDATE SET definition = excluded.definition,
    definition_facts = excluded.definition_facts, updated_at = now();

-- name: set_schemas
-- A NULL schema leaves the stored one as it is.
INSERT INTO job_state (job, input_schema, output_schema, updated_at)
VALUES ($job, $input_schema, $output_schema, now())
ON CONFLICT (job) DO UPDATE SET
    input_schema = coalesce(excluded.input_schema, job_state.input_schema),
    output_schema = coalesce(excluded.output_schema, job_state.output_schema),
    updated_at = now();

-- name: reduce_key
SELECT parts_key FROM reduce_state WHERE job = $job;

-- name: record_reduce
INSERT OR REPLACE INTO reduce_state (job, parts_key, reduced_at) VALUES ($job, $key, now());

-- name: last_fires
SELECT job, last_fire_at FROM schedule_state;

-- name: unfinished_runs
-- Jobs (not parameter sets) whose latest run neither succeeded nor failed nor was cancelled.
SELECT job, status FROM (
    SELECT job, status, error, row_number() OVER (PARTITION BY job ORDER BY seq DESC NULLS LAST, started_at DESC) AS latest FROM runs
) WHERE latest = 1 AND NOT contains(job, '[') AND status NOT IN (SELECT unnest($done::VARCHAR[]))
    AND NOT starts_with(coalesce(error, ''), $cancelled);

-- name: waiting_fires
SELECT job, params FROM waiting_fires ORDER BY fired_at;

-- name: wait_fire
INSERT OR REPLACE INTO waiting_fires (job, params, fired_at) VALUES ($job, $params, $at);

-- name: unwait_fire
DELETE FROM waiting_fires WHERE job = $job AND params = $params;

-- name: record_fire
INSERT OR REPLACE INTO schedule_state (job, last_fire_at) VALUES ($job, $at);

-- name: unmet_dependencies
-- For each dependency: is the latest run of one of its parameter sets (of the job itself, if
-- it has none) one that succeeded since the job's own last finished run started? Not one
-- running now, rebuilding its output, nor one that failed or stopped.
WITH mine AS (
    SELECT max(started_at) AS since FROM runs
    WHERE (job = $job OR starts_with(job, $job || '[')) AND status IN (SELECT unnest($finished::VARCHAR[]))
),
latest AS (SELECT job, status, ended_at FROM runs QUALIFY row_number() OVER (PARTITION BY job ORDER BY seq DESC NULLS LAST, started_at DESC) = 1)
SELECT dep, EXISTS (
    SELECT 1 FROM latest
    WHERE (latest.job = dep OR starts_with(latest.job, dep || '[')) AND latest.status = $succeeded
      AND (mine.since IS NULL OR latest.ended_at > mine.since)
) AS ok
FROM unnest($deps::VARCHAR[]) AS deps(dep), mine;

-- name: status
-- The latest run of each job (or of one), with its checkpoint's chunk counts: of a job with
-- parameters, its latest parameter set's run and checkpoint (`job_name` is the job).
WITH latest AS (
    SELECT *, split_part(job, '[', 1) AS job_name FROM runs
    WHERE $job IS NULL OR (job = $job OR starts_with(job, $job || '['))
    QUALIFY row_number() OVER (PARTITION BY job_name ORDER BY seq DESC NULLS LAST, started_at DESC) = 1
), totals AS (
    SELECT job,
           count(*) FILTER (WHERE status = $done) AS done_total,
           count(*) FILTER (WHERE status = $dead) AS dead_total,
           sum(rows_out) FILTER (WHERE status = $done) AS rows_out_total,
           sum(bytes_out) FILTER (WHERE status = $done) AS bytes_out_total
    FROM chunks GROUP BY job
), bad AS (
    SELECT job, count(*) AS bad_files_total FROM bad_files GROUP BY job
), successes AS (
    SELECT split_part(job, '[', 1) AS job_name, max(ended_at) AS last_success_at FROM runs
    WHERE status = $succeeded GROUP BY job_name
)
SELECT latest.*, coalesce(totals.done_total, 0) AS done_total,
       coalesce(totals.dead_total, 0) AS dead_total,
       coalesce(totals.rows_out_total, 0) AS rows_out_total,
       coalesce(totals.bytes_out_total, 0) AS bytes_out_total,
       coalesce(bad.bad_files_total, 0) AS bad_files_total,
       successes.last_success_at
FROM latest LEFT JOIN totals USING (job) LEFT JOIN bad USING (job) LEFT JOIN successes USING (job_name)
ORDER BY job;

-- name: runs
-- A job's runs include those of its parameter sets (job `daily[date=2026-11-01]`).
SELECT * FROM runs WHERE $job IS NULL OR (job = $job OR starts_with(job, $job || '[')) ORDER BY seq DESC NULLS LAST, started_at DESC LIMIT $limit;

-- name: run
SELECT * FROM runs WHERE (job = $job OR starts_with(job, $job || '[')) AND ($run_id IS NULL OR run_id = $run_id)
ORDER BY seq DESC NULLS LAST, started_at DESC LIMIT 1;

-- name: run_with_work
-- The latest run of a job that did something: computed or dead-lettered chunks, or failed.
SELECT * FROM runs
WHERE job = $job AND (chunks_done > 0 OR chunks_dead > 0 OR status <> $succeeded)
ORDER BY seq DESC NULLS LAST, started_at DESC LIMIT 1;

-- name: attempts
SELECT * FROM attempts WHERE run_id = $run_id ORDER BY admitted_at, chunk_id, attempt;

-- name: dead_letters
SELECT chunk_id, file, row_start, row_end, attempts, error_type, error_message, finished_at
FROM chunks WHERE job = $job AND status = $dead ORDER BY file, row_start;

-- name: is_current
-- Whether the file has this release's schema (its newest column).
SELECT 1 FROM duckdb_columns()
WHERE database_name = current_database() AND table_name = 'runs' AND column_name = 'seq';

-- name: learned_memory
-- What a job's recent attempts grew (peak minus start RSS) per byte of their estimated size
-- in Arrow (older attempts: of the footer's size), at the 90th percentile, from chunks of
-- $min_bytes and more, each worker's first attempt of a run left out (it pays the worker's
-- start-up); and that start-up: what the first attempts, of any size, grew beyond their chunk
-- at that factor, at the 90th percentile, and no more than the most a recent run that did work
-- measured above idle per worker (an attempt's RSS counts the library pages a first chunk maps,
-- shared and file-backed: a review's SQL job of 38 KiB chunks learned 53 MiB a worker, measured 8).
-- (A worker's attempts are numbered before any is left out: its first may have failed, or been small.)
WITH attempt AS (
    SELECT greatest(peak_rss - start_rss, 0) AS grew, size, nth, ended_at FROM (
        SELECT *, coalesce(chunk_size, chunk_bytes) AS size,
            row_number() OVER (PARTITION BY run_id, pid ORDER BY started_at) AS nth
        FROM attempts WHERE job = $job
    ) WHERE outcome = 'done' AND start_rss IS NOT NULL AND peak_rss IS NOT NULL
), per_byte AS (
    SELECT quantile_cont(grew / size, 0.9) AS factor FROM (
        SELECT grew, size FROM attempt WHERE nth > 1 AND size >= $min_bytes ORDER BY ended_at DESC LIMIT 200
    )
), first AS (
    SELECT quantile_cont(greatest(grew - coalesce(factor, 0) * size, 0), 0.9) AS startup FROM (
        SELECT grew, size FROM attempt WHERE nth = 1 ORDER BY ended_at DESC LIMIT 50
    ), per_byte
), measured AS (  -- runs that did work, of any parameters (their key is job[k=v])
    SELECT max(peak_memory // greatest(workers, 1)) AS per_worker FROM (
        SELECT peak_memory, workers FROM runs
        WHERE (job = $job OR starts_with(job, $job || '[')) AND peak_memory IS NOT NULL AND chunks_done > 0
        ORDER BY seq DESC LIMIT 5
    )
)
SELECT factor, CASE WHEN startup IS NOT NULL THEN least(startup, coalesce(per_worker, startup)) END AS startup
FROM per_byte, first, measured;  -- (least() skips NULLs: no start-up learned stays none)

-- name: latest_runs
-- The latest run of each parameter set of a job: what a backfill's --reprocess decides on,
-- with where it put its results and the definition they are of.
SELECT runs.job, status, run_id, parts_dir, definition
FROM runs LEFT JOIN job_state ON job_state.job = runs.job WHERE starts_with(runs.job, $job || '[')
QUALIFY row_number() OVER (PARTITION BY runs.job ORDER BY seq DESC NULLS LAST, started_at DESC) = 1;

-- name: unfinished_backfill
-- The backfill a new one with the same job, range and parameters continues.
SELECT backfill_id FROM backfills
WHERE job = $job AND first_date = $first AND last_date = $last AND params = $params
  AND status IN ('running', 'stopped')
ORDER BY created_at DESC LIMIT 1;

-- name: insert_backfill
INSERT INTO backfills (backfill_id, job, first_date, last_date, params, reprocess, max_parallel,
                       backwards, status, pid, created_at)
VALUES ($id, $job, $first, $last, $params, $reprocess, $max_parallel, $backwards, 'running', $pid, now());

-- name: insert_backfill_dates
INSERT INTO backfill_dates (backfill_id, logical_date, position, action, status, updated_at)
SELECT $id, unnest($dates::DATE[]), unnest($positions::INTEGER[]), unnest($actions::VARCHAR[]),
       unnest($statuses::VARCHAR[]), now();

-- name: resume_backfill
UPDATE backfills SET status = 'running', pid = $pid, max_parallel = $max_parallel, ended_at = NULL
WHERE backfill_id = $id;

-- name: end_backfill
UPDATE backfills SET status = $status, ended_at = now() WHERE backfill_id = $id;

-- name: set_backfill_date
UPDATE backfill_dates SET status = $status, run_id = coalesce($run_id, run_id), error = $error,
    updated_at = now()
WHERE backfill_id = $id AND logical_date = $date;

-- name: backfill
SELECT * FROM backfills WHERE backfill_id = $id;

-- name: backfills
SELECT * FROM backfills WHERE $job IS NULL OR job = $job ORDER BY created_at DESC LIMIT $limit;

-- name: backfill_dates
-- A backfill's dates with their runs' counts.
SELECT d.logical_date, d.action, d.status, d.run_id, d.error, r.chunks_done, r.chunks_total,
       r.rows_out, epoch(r.ended_at - r.started_at) AS seconds
FROM backfill_dates d LEFT JOIN runs r USING (run_id)
WHERE d.backfill_id = $id ORDER BY d.position;

-- name: backfill_of_run
SELECT backfill_id FROM backfill_dates WHERE run_id = $run_id;

-- name: paused
SELECT job, paused_at FROM paused_jobs;

-- name: pause
INSERT OR IGNORE INTO paused_jobs (job, paused_at) VALUES ($job, now());

-- name: fired_if_paused
INSERT OR REPLACE INTO schedule_state (job, last_fire_at) SELECT job, $at FROM paused_jobs WHERE job = $job;

-- name: unpause
DELETE FROM paused_jobs WHERE job = $job;

-- name: run_by_id
SELECT * FROM runs WHERE run_id = $run_id;

-- name: results_recorded
-- Chunks recorded done with a result file (a chunk whose result had no rows has none), and
-- where the latest run that could write put its results (a refused run records no place).
SELECT (SELECT count(*) FROM chunks WHERE job = $key AND status = $done AND output_file IS NOT NULL) AS n,
       (SELECT parts_dir FROM runs WHERE job = $key AND parts_dir IS NOT NULL
        ORDER BY seq DESC NULLS LAST, started_at DESC LIMIT 1) AS parts_dir;

-- name: has_run
SELECT 1 FROM runs WHERE job = $key LIMIT 1;

-- name: input_files
-- The input files of the job's recorded chunks, and their fingerprints.
SELECT file, list(DISTINCT fingerprint) AS prints FROM chunks WHERE job = $key GROUP BY file;

-- name: input_mounts
-- The mount points above the inputs of the latest run that read them (a refused run records none).
SELECT mounts FROM runs WHERE job = $key AND mounts IS NOT NULL ORDER BY seq DESC NULLS LAST, started_at DESC LIMIT 1;

-- name: succeeded_run
-- The parameter set's latest run succeeded (not one running now, failed or stopped).
SELECT 1 FROM (SELECT status FROM runs WHERE job = $key ORDER BY seq DESC NULLS LAST, started_at DESC LIMIT 1)
WHERE status = $succeeded;

-- name: record_check
INSERT OR REPLACE INTO check_counts (job, run_id, check_name, action, rows_failed)
VALUES ($job, $run_id, $check_name, $action, $rows_failed);

-- name: check_counts
SELECT check_name, action, rows_failed FROM check_counts WHERE run_id = $run_id ORDER BY check_name;

-- name: done_rows
-- What the job's output is made of now: its done chunks' rows, kept and kept out by checks.
SELECT coalesce(sum(rows_bad), 0) AS rows_bad, coalesce(sum(rows_out), 0) AS rows_out
FROM chunks WHERE job = $job AND status = 'done';
