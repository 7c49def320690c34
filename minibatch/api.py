"""The daemon's HTTP job API (FastAPI on uvicorn, in a thread of the daemon; the `api` extra).

Trigger, watch, cancel, pause and backfill, for other systems. Typed request and response
models, the OpenAPI schema at /openapi.json, every error as application/problem+json
(RFC 9457). With `api_token_file` set every request needs `Authorization: Bearer TOKEN`
(compared in constant time); without it the API may listen on loopback only (config.py).
No endpoint takes a path: a client names jobs, runs and backfills, never files.
"""

from __future__ import annotations

import datetime as dt
import hmac
import socket
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException

from minibatch.backfill import BackfillRequest
from minibatch.config import ConfigError, EngineConfig
from minibatch.control import Control, ControlError
from minibatch.log import get_logger

PROBLEM = "application/problem+json"
log = get_logger()


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str


class Run(BaseModel):
    run_id: str
    job: str = Field(description="the job, with its parameters: daily[date=2026-11-01]")
    params: dict[str, str]
    status: str
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    chunks_total: int | None
    chunks_done: int | None
    chunks_reused: int | None
    chunks_dead: int | None
    chunks_skipped: int | None
    bad_files: int | None
    rows_in: int | None
    rows_out: int | None
    bytes_out: int | None
    error: str | None
    peak_memory: int | None
    memory_limit: int | None
    report: str = Field(description="the run's HTML report")


class Job(BaseModel):
    name: str
    description: str
    schedule: str | None
    timezone: str
    params: list[str]
    paused: bool
    next_fire: dt.datetime | None
    running: list[str] = Field(description="ids of its runs in flight")
    last_run: Run | None


class TriggerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: dict[str, str] = Field(default_factory=dict, examples=[{"date": "2026-11-01"}])
    fresh: StrictBool = False  # not "yes" or 1: a typo'd body must not start a fresh run
    retry_dead: StrictBool = False


class Accepted(BaseModel):
    run_id: str
    job: str
    status: str
    url: str


class Cancelled(BaseModel):
    run_id: str
    job: str
    status: str


class BackfillBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    job: str
    from_date: dt.date = Field(alias="from")
    to_date: dt.date = Field(alias="to")
    params: dict[str, str] = Field(default_factory=dict)
    reprocess: Literal["none", "failed", "all"] = "none"
    max_parallel: int = Field(1, ge=1, le=64)
    backwards: StrictBool = False


class BackfillAccepted(BaseModel):
    backfill_id: str
    job: str
    status: str
    url: str


class BackfillDate(BaseModel):
    date: dt.date
    action: str
    status: str
    run_id: str | None
    error: str | None
    chunks_done: int | None = None
    chunks_total: int | None = None
    rows_out: int | None = None
    seconds: float | None = None


class Backfill(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    backfill_id: str
    job: str
    status: str
    from_date: dt.date = Field(alias="from")
    to_date: dt.date = Field(alias="to")
    params: dict[str, str]
    reprocess: str
    max_parallel: int
    backwards: bool
    dates: list[BackfillDate]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {PROBLEM: {}}} for code in (401, 403, 404, 409, 422, 429, 503)
}


def create_app(control: Control, token: str | None) -> FastAPI:
    app = FastAPI(
        title="minibatch", summary="Trigger, watch, cancel, pause and backfill minibatch jobs.",
        version=_version(), responses=ERRORS,
        dependencies=[Depends(_not_a_browser(token)), Depends(_auth(token))],
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN
    )  # fmt: skip
    _problems(app)
    _job_routes(app, control)
    _run_routes(app, control)
    return app


def _job_routes(app: FastAPI, control: Control) -> None:
    @app.get("/jobs", response_model=list[Job])
    def jobs() -> list[dict[str, Any]]:
        return control.jobs()

    @app.get("/jobs/{job}", response_model=Job)
    def job(job: str) -> dict[str, Any]:
        return control.job(job)

    @app.post("/jobs/{job}/runs", response_model=Accepted, status_code=202)
    def trigger(job: str, body: TriggerBody | None = None) -> dict[str, Any]:
        body = body or TriggerBody()
        return control.trigger(job, body.params, body.fresh, body.retry_dead)

    @app.post("/jobs/{job}/pause", response_model=Job)
    def pause(job: str) -> dict[str, Any]:
        return control.pause(job, True)

    @app.post("/jobs/{job}/resume", response_model=Job)
    def resume(job: str) -> dict[str, Any]:
        return control.pause(job, False)


def _run_routes(app: FastAPI, control: Control) -> None:
    @app.get("/runs", response_model=list[Run])
    def runs(job: str | None = None, limit: int = Query(20, ge=1, le=1000)) -> list[dict[str, Any]]:
        return control.runs(job, limit)

    @app.get("/runs/{run_id}", response_model=Run)
    def run(run_id: str) -> dict[str, Any]:
        return control.run(run_id)

    @app.get("/runs/{run_id}/report", response_class=HTMLResponse)
    def report(run_id: str) -> str:
        return control.report(run_id)

    @app.post("/runs/{run_id}/cancel", response_model=Cancelled, status_code=202)
    def cancel(run_id: str) -> dict[str, Any]:
        return control.cancel(run_id)

    @app.post("/backfills", response_model=BackfillAccepted, status_code=202)
    def backfill(body: BackfillBody) -> dict[str, Any]:
        request = BackfillRequest(
            job=body.job, first=body.from_date, last=body.to_date, params=body.params,
            reprocess=body.reprocess, max_parallel=body.max_parallel, backwards=body.backwards,
        )  # fmt: skip
        return control.backfill(request)

    @app.get("/backfills/{backfill_id}", response_model=Backfill)
    def backfill_info(backfill_id: str) -> dict[str, Any]:
        return control.backfill_info(backfill_id)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _not_a_browser(token: str | None) -> Any:
    """A web page can send requests to a loopback API (form posts need no preflight) and, by
    DNS rebinding, read answers: refuse any request that carries an Origin, and without a
    token any whose Host is not a loopback name."""

    def check(request: Request) -> None:
        if "origin" in request.headers:
            raise ControlError(403, "Forbidden", "requests from web pages (with an Origin) are refused")
        host = (request.headers.get("host") or "").rpartition(":")[0] or request.headers.get("host", "")
        if token is None and host.strip("[]") not in LOOPBACK:
            raise ControlError(403, "Forbidden", f"Host {host!r} is not loopback; this API has no token")

    return check


def _auth(token: str | None) -> Any:
    bearer = HTTPBearer(auto_error=False)

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if token is None:
            return
        given = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ControlError(
                401, "Unauthorized", "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
            )

    return check


def _problems(app: FastAPI) -> None:
    def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        body = Problem(title=title, status=status, detail=detail).model_dump()
        return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)

    @app.exception_handler(ControlError)
    def control_error(request: Request, exc: ControlError) -> JSONResponse:
        return problem(exc.status, exc.title, exc.detail, exc.headers)

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    def crashed(request: Request, exc: Exception) -> JSONResponse:
        return problem(500, "Internal error", f"{type(exc).__name__}: {exc}")

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return problem(422, "Invalid request", details)


def _version() -> str:
    from importlib.metadata import version

    return version("minibatch")


def read_token(path: Path) -> str:
    """The bearer token, from a file only its owner may read (like an ssh key)."""
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"api_token_file {path} is readable by others; chmod 600 {path}")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"api_token_file {path} holds a token under 16 characters")
    return token


class ApiServer:
    """uvicorn serving the app from a thread; the socket is bound first, so a port in use is
    the daemon's error at start, not a thread's silent death."""

    def __init__(self, app: FastAPI, addr: str) -> None:
        import uvicorn

        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.sock.listen(128)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()


def serve_api(engine: EngineConfig, control: Control) -> ApiServer:
    """Start the HTTP API in a thread: the server (a bad address or token: ConfigError)."""
    try:
        token = read_token(engine.api_token_file) if engine.api_token_file else None
        server = ApiServer(create_app(control, token), engine.api_addr)
    except (OSError, ValueError) as exc:
        problem = f"minibatch.api_addr: cannot serve the API on {engine.api_addr}: {exc}"
        raise ConfigError([problem]) from None
    server.start()
    log.info("api_listening", addr=engine.api_addr, token=token is not None)
    return server
