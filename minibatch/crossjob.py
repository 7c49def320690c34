"""Checks across a config's jobs: outputs kept apart, dependencies known and acyclic."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import product
from pathlib import Path
from typing import Protocol

from minibatch.jobcode import module_files
from minibatch.layout import OutputLayout, default_held
from minibatch.owner import OutputNotOwned


class JobConfig(Protocol):  # what is read of config.JobConfig (config imports this module)
    @property
    def name(self) -> str: ...
    @property
    def output(self) -> Path: ...
    @property
    def process(self) -> str | None: ...
    @property
    def reduce_sql(self) -> str | None: ...
    @property
    def depends_on(self) -> tuple[str, ...]: ...
    @property
    def values(self) -> tuple[tuple[str, object], ...]: ...


def check_outputs_apart(
    jobs: Mapping[str, JobConfig], config_path: Path, state_dir: Path, errors: list[str]
) -> None:
    """Each job owns its output, which must not hold what `reset` would then delete: the
    config file, job code, the state directory, or another job's output, staging or parts."""
    clashes = _clashes(jobs)
    for name in sorted(jobs):
        problems = precious_inside(jobs[name], config_path, state_dir)
        errors += [f"jobs.{name}.output: {problem}" for problem in problems]
        for other in sorted(clashes.get(name, ())):
            errors.append(f"jobs.{other}.output: {jobs[other].output} overlaps the output of job {name!r}")


def _clashes(jobs: Mapping[str, JobConfig]) -> dict[str, set[str]]:
    """Each job -> the jobs after it by name that overlap it: any of their places (output,
    staging, parts, held rows) nested in one of the other's, either way: each job empties its
    own (a quarantine in another's staging went with its next run). Found by looking up each
    place's ancestors, not by comparing every pair (200 jobs took 6 s)."""
    at: dict[tuple[str, ...], list[tuple[str, str]]] = {}  # a place's path parts -> (job, role)
    for name, job in jobs.items():
        layout = OutputLayout.of(job)
        places = [(layout.output, "output"), (layout.staging, "aside"), (layout.parts, "aside")]
        places += [(held, "held") for held in (*layout.held, *default_held(layout.output))]
        for path, role in places:
            at.setdefault(path.parts, []).append((name, role))
    clashes: dict[str, set[str]] = {}
    for parts, here in at.items():
        for depth in range(1, len(parts) + 1):  # every place at or above this one
            for (one, _), (two, _) in product(here, at.get(parts[:depth], ())):
                if one != two:
                    first, second = sorted((one, two))
                    clashes.setdefault(first, set()).add(second)
    return clashes


def precious_inside(job: JobConfig, config_path: Path, state_dir: Path) -> list[str]:
    """What `reset` of the job would delete that is not output: the config file, the
    state_dir, job code (checked again for each parameter set's rendered output)."""
    precious = [("the config file", config_path), ("the state_dir", state_dir.resolve())]
    if job.process:
        precious += [("job code", path) for path in module_files(config_path.parent, job.process)]
    return [f"{job.output} contains {what} ({path})" for what, path in precious if _holds(job.output, path)]


def check_rendered(job: JobConfig, jobs: Mapping[str, JobConfig], config_path: Path, state_dir: Path) -> None:
    """Refuse (OutputNotOwned) a parameter set's rendered output (its quarantine too), which
    only the template was checked for, holding precious files, or on another job's output,
    staging, parts or quarantine (each job whose output is not a template itself)."""
    if not job.values:
        return
    problems = precious_inside(job, config_path, state_dir)
    if reserved := _reserved_name(job.output, jobs[job.name].output):
        problems.append(
            f"{job.output}: {reserved!r} is named like what minibatch keeps beside an output (its "
            "quarantined or malformed rows, its staging): choose another parameter value"
        )
    others = {
        name: other for name, other in jobs.items() if name != job.name and "{" not in str(other.output)
    }
    clashes = _clashes({**others, job.name: job})
    partners = clashes.get(job.name, set()) | {name for name, them in clashes.items() if job.name in them}
    problems += [f"{job.output} overlaps the output of job {name!r}" for name in sorted(partners)]
    if problems:
        raise OutputNotOwned(problems[0])


RESERVED_ENDINGS = (".quarantine", ".malformed", ".minibatch-staging", ".minibatch-parts")


def _reserved_name(rendered: Path, template: Path) -> str | None:
    """A directory of the rendered part of an output named as another output's held rows or
    staging would be: a value can make one parameter set's output another's quarantine, which no
    owner file guards (templates are only known as rendered)."""
    fixed = next(p for p in (template, *template.parents) if "{" not in str(p))
    tail = rendered.relative_to(fixed).parts if rendered.is_relative_to(fixed) else rendered.parts
    return next((part for part in tail if part.endswith(RESERVED_ENDINGS)), None)


def _holds(directory: Path, path: Path) -> bool:
    return path.parts[: len(directory.parts)] == directory.parts  # `in path.parents` is slow


def check_dependencies(jobs: Mapping[str, JobConfig], errors: list[str]) -> None:
    for job in jobs.values():
        for dep in job.depends_on:
            if dep not in jobs:
                errors.append(f"jobs.{job.name}.depends_on: unknown job {dep!r}")
    cycle = _find_cycle({name: [d for d in j.depends_on if d in jobs] for name, j in jobs.items()})
    if cycle:
        errors.append(f"jobs.{cycle[0]}.depends_on: dependency cycle {' -> '.join(cycle)}")


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for dep in graph[node]:
            if found := visit(dep, path + [node]):
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        if found := visit(start, []):
            return found
    return None
