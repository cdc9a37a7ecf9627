# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
# The FID tests compare with pytorch-fid's function, read from its source: --no-deps, torch is never needed.
	$(BIN)/python -m pip install --quiet --no-deps pytorch-fid==0.3.0
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The main job on the bundled 48-product sample (data/demo): captions, LoRA training at 64 px
# on the CPU, then FID/KID of the base model and every checkpoint (about 6 minutes on 2 cores;
# random-init weights and an untrained Inception, each labelled so, unless real ones are cached).
demo: setup
	$(BIN)/python scripts/build_captions.py --config configs/demo.yaml
	$(BIN)/python scripts/train.py --config configs/demo.yaml --fresh
	$(BIN)/python scripts/evaluate_fid.py --config configs/demo.yaml --checkpoints runs/demo/checkpoints --include-base

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache
