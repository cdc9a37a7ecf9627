# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The main job on the bundled 48-product sample (data/demo): captions for now.
demo: setup
	$(BIN)/python scripts/build_captions.py --config configs/demo.yaml

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache
