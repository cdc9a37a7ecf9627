# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

JAX_VENV ?= .venv-jax
JAX_STAMP := $(JAX_VENV)/.installed
# keras-hub (DINOv2, CLIP) without its dependencies: they pin tensorflow-text, which only its
# text presets use, and a kagglesdk that would downgrade kagglehub; its runtime needs are in the
# requirements files.
KERAS_HUB := keras-hub==0.32.0

.PHONY: setup setup-test setup-jax browser demo app test test-heavy clean

setup: $(STAMP)

# Tests also need the interop extra (torch, diffusers: the peers our conversions are proven
# against), the JAX environment and a real browser for the assistant's end-to-end test: three
# independent installs, made side by side (mostly waiting on downloads).
setup-test:
	@$(MAKE) --no-print-directory -j3 $(TEST_STAMP) $(JAX_STAMP) browser

# Keras on JAX without TensorFlow or keras_cv (a GPU machine's setup): the tests run the
# networks, training and generation in it and compare with the TensorFlow backend.
setup-jax: $(JAX_STAMP)

$(JAX_STAMP): requirements-jax.txt pyproject.toml
	$(PYTHON) -m venv $(JAX_VENV)
	$(JAX_VENV)/bin/python -m pip install --quiet -r requirements-jax.txt
	$(JAX_VENV)/bin/python -m pip install --quiet --no-deps $(KERAS_HUB)
	$(JAX_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(JAX_STAMP)

$(TEST_STAMP): $(STAMP) requirements-interop.txt
	$(BIN)/python -m pip install --quiet -r requirements-interop.txt
# The FID protocol tests compare our resizes with clean-fid's own (cleanfid.resize needs only
# torch, numpy and PIL): --no-deps keeps torchvision, which nothing here uses, out.
	$(BIN)/python -m pip install --quiet --no-deps clean-fid==0.1.35
# CMMD's reference (clip_mmd.calculation needs only torch and numpy): --no-deps, as clean-fid.
	$(BIN)/python -m pip install --quiet --no-deps clip-mmd==0.0.2
	touch $(TEST_STAMP)

# Debian's Chromium and its WebDriver (root, or sudo, installs them once).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

$(STAMP): requirements.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
# The FID tests compare with pytorch-fid's function, read from its source: --no-deps, torch is never needed.
	$(BIN)/python -m pip install --quiet --no-deps pytorch-fid==0.3.0
	$(BIN)/python -m pip install --quiet --no-deps $(KERAS_HUB)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The main job on the bundled 48-product sample (data/demo): captions, LoRA training at 64 px
# on the CPU, then FID/KID of the base model and every checkpoint (about 6 minutes on 2 cores;
# random-init weights and an untrained Inception, each labelled so, unless real ones are cached).
demo: setup
	$(BIN)/python scripts/build_captions.py --config configs/demo.yaml
	$(BIN)/python scripts/train.py --config configs/demo.yaml --fresh
	$(BIN)/python scripts/evaluate_fid.py --config configs/demo.yaml --checkpoints runs/demo/checkpoints --include-base

# The assistant on the demo run (after `make demo`): open http://127.0.0.1:7860
app: setup
	$(BIN)/python scripts/app.py --config configs/demo.yaml --run runs/demo

# The tests use about one of the machine's two cores on average (measured: 322 s of CPU in 311 s
# of a fast-test stretch), so they run as two lanes side by side. TensorFlow and Keras keep much
# of what each test built, and one process outgrew the 24 GB machines CI runs on, so each lane
# is a row of fresh processes:
#   lane 1 (this terminal): the fast tests, the training ones in a process of their own;
#   lane 2 (test-heavy, its output in .test-logs/heavy.log, printed when both lanes are done):
#   the real-size networks against KerasCV's and on JAX; the other real-size models (marked
#   slow); the app served for real (beside the other real-size models that process reached
#   17 GB and, with lane 1 beside it, filled the machine); the tests that start big processes
#   (the sweep from a non-editable install on a weights folder, the text encoder's LoRA, the
#   XLA U-Net check, the commands and the app on JAX); the notebooks, whose kernels train the
#   U-Net.
# Every process always runs; the target fails if any did.
test: setup-test
	@mkdir -p .test-logs
	@echo "lane 2 (the real-size tests) runs beside this one: .test-logs/heavy.log"
	@$(MAKE) --no-print-directory test-heavy > .test-logs/heavy.log 2>&1 & heavy=$$!; \
	$(BIN)/python -m pytest -m "not slow" --ignore=tests/training; fast=$$?; \
	$(BIN)/python -m pytest -m "not slow" tests/training; training=$$?; \
	wait $$heavy; heavy=$$?; \
	echo "==== lane 2: the real-size tests (.test-logs/heavy.log) ===="; cat .test-logs/heavy.log; \
	test $$fast -eq 0 -a $$training -eq 0 -a $$heavy -eq 0

test-heavy: setup-test
	$(BIN)/python -m pytest -m slow tests/sd/test_networks.py; networks=$$?; \
	$(BIN)/python -m pytest -m slow --ignore=tests/test_notebooks.py --ignore=tests/test_cli.py \
	  --ignore=tests/training --ignore=tests/test_jax_commands.py \
	  --ignore=tests/sd/test_networks.py --ignore=tests/serving/test_app.py; slow=$$?; \
	$(BIN)/python -m pytest tests/serving/test_app.py; app=$$?; \
	$(BIN)/python -m pytest -m slow tests/test_cli.py tests/training tests/test_jax_commands.py; \
	  install=$$?; \
	$(BIN)/python -m pytest tests/test_notebooks.py; notebooks=$$?; \
	test $$networks -eq 0 -a $$slow -eq 0 -a $$app -eq 0 -a $$install -eq 0 -a $$notebooks -eq 0

clean:
	rm -rf runs .pytest_cache
