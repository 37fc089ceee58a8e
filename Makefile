# The two quickstart commands: `make demo` (main job) and `make test` (test suite).
# Both work on a fresh machine: they create .venv and install exactly what uv.lock pins.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# The bootstrap uv; the lock pins the same version (test extra), so `uv sync` keeps it.
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# uv installs into $(VENV); PYTHONDONTWRITEBYTECODE is set on some machines, so compile at install
# (imports of torch/lightning/peft take 3x longer from source).
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))

.PHONY: demo test lock lock-check system-deps venv clean-venv

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): pyproject.toml uv.lock | $(UV)
	@$(UV) lock --locked --quiet 2>/dev/null || { echo "uv.lock does not match pyproject.toml: run 'make lock' and commit uv.lock" >&2; exit 1; }
	$(UV) sync --locked --extra test --compile-bytecode --quiet
	$(PY) -m fishtune.setup_check
	touch $(STAMP)

venv: $(STAMP)

# Refresh the lock: every pin moves to the newest release pyproject.toml allows. Then run `make test`
# and commit uv.lock with the result.
lock: | $(UV)
	$(UV) lock --upgrade

lock-check: | $(UV)
	$(UV) lock --locked

# Test audio is spoken by espeak-ng and converted by sox; the Prefect UI test drives Debian's
# headless Chromium through chromedriver; the shared cache-lock tests start a redis-server on
# 127.0.0.1. All Debian packages, installed only when missing.
system-deps:
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null && command -v chromium >/dev/null \
	  && command -v chromedriver >/dev/null && command -v redis-server >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox chromium chromium-driver redis-server >/dev/null; }

demo: $(STAMP)
	$(VENV)/bin/fishtune demo

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
