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
# The FID tests compare with pytorch-fid's function, read from its source: --no-deps, torch is never needed.
	$(BIN)/python -m pip install --quiet --no-deps pytorch-fid==0.3.0
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The main job on the bundled 48-product sample (data/demo): captions, then LoRA training at
# 64 px on the CPU (a few minutes; random-init weights unless pretrained ones are cached).
demo: setup
	$(BIN)/python scripts/build_captions.py --config configs/demo.yaml
	$(BIN)/python scripts/train.py --config configs/demo.yaml --fresh

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache
