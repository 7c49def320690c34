# syntax=docker/dockerfile:1
# The minibatch daemon as a container image (docs/deploying.md):
#   docker build -t minibatch .
#   docker compose up -d          # with Prometheus and Grafana, see docker-compose.yml
#
# Layout inside the image, matching the example config.toml's relative paths:
#   /srv/minibatch/config.toml    your config: mount it (read-only); it must set
#                                 metrics_addr = "0.0.0.0:9464" for Prometheus and the HEALTHCHECK
#   /srv/minibatch/jobs/          your job code: mount it read-only (or COPY it in a derived image)
#   /srv/minibatch/data/          inputs (a volume or a read-only bind mount)
#   /srv/minibatch/out/           outputs (a volume: staging lives beside each output, same filesystem)
#   /srv/minibatch/.minibatch/    state_dir: the manifest, locks, reports (a volume)
# The daemon runs as uid 10001, which can write only the last three; strict modes refuse config
# or job code that group or others can write (chmod go-w).

ARG PYTHON_VERSION=3.12

# -- builder: the minibatch wheel and a wheel of every dependency ------------------------------
FROM python:${PYTHON_VERSION}-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY minibatch/ minibatch/
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[api]"

# -- runtime: Python and the installed wheel, nothing else -------------------------------------
FROM python:${PYTHON_VERSION}-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MINIBATCH_CONFIG=/srv/minibatch/config.toml
RUN groupadd --system --gid 10001 minibatch \
    && useradd --system --uid 10001 --gid minibatch --home-dir /srv/minibatch --no-create-home \
        --shell /usr/sbin/nologin minibatch \
    && mkdir -p /srv/minibatch/jobs \
    && install -d -o minibatch -g minibatch -m 0750 \
        /srv/minibatch/.minibatch /srv/minibatch/data /srv/minibatch/out
# The wheels are bind-mounted from the builder, so they take no layer of this image; installing
# from them alone (--no-index) installs exactly what the builder resolved, with the HTTP API's
# extra (on the container's loopback: `docker exec ... minibatch cancel RUN`). `minibatch
# --version` imports the installed package: a wheel without its SQL files fails the build here.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels \
        /wheels/minibatch-*.whl /wheels/fastapi-*.whl /wheels/uvicorn-*.whl \
    && minibatch --version
WORKDIR /srv/minibatch
USER 10001:10001
EXPOSE 9464
# The daemon's Prometheus endpoint answers while the daemon runs (metrics_addr on port 9464).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=4)"]
# SIGTERM (docker stop) lets chunks in flight finish within stop_grace (30 s by default): give
# the container longer than that (docker stop -t 45; compose: stop_grace_period). Run it with an
# init (docker run --init; compose: init: true) so that PID 1 reaps orphaned processes.
ENTRYPOINT ["minibatch"]
CMD ["daemon"]
