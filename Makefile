# The two quickstart commands: `make demo` (main job) and `make test` (test suite).
# Both work on a fresh machine: they create .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test system-deps venv clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Test audio is spoken by espeak-ng and converted by sox; the Prefect UI test drives Debian's
# headless Chromium through chromedriver. All Debian packages, installed only when missing.
system-deps:
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null && command -v chromium >/dev/null \
	  && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox chromium chromium-driver >/dev/null; }

demo: $(STAMP)
	$(VENV)/bin/fishtune demo

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
