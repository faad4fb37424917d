# raytopk — the two commands of the README, and the set-up they share.
#   make demo   train the quickstart cascade on synthetic RecFlow-layout data (local Ray)
#   make test   ruff + the whole test suite (unit and local-Ray integration)
# Both create .venv and install what is missing, on a fresh machine, with nothing run before.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# GPU machines get the CUDA torch from PyPI and faiss-gpu; everything else gets CPU builds.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_GPU),gpu,cpu),dev,cluster
STAMP := $(VENV)/.installed-$(if $(HAS_GPU),gpu,cpu)
# Where a CPU-only torch comes from when no local CPU wheel is configured for pip.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if [ -n "$(HAS_GPU)" ]; then \
	    echo "[setup] GPU found: installing torch with CUDA from PyPI"; \
	    $(BIN)/pip install -q "torch>=2.4"; \
	  elif $(BIN)/pip download -q --no-deps --no-index -d $(VENV)/.torch-probe "torch==2.13.0" >/dev/null 2>&1; then \
	    echo "[setup] no GPU: installing the local CPU build torch==2.13.0"; \
	    $(BIN)/pip install -q "torch==2.13.0"; \
	  else \
	    echo "[setup] no GPU: installing a CPU build of torch from $(TORCH_CPU_INDEX)"; \
	    $(BIN)/pip install -q torch --index-url $(TORCH_CPU_INDEX); \
	  fi; \
	  rm -rf $(VENV)/.torch-probe; \
	fi
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@touch $@

demo: setup
	$(BIN)/python jobs/train.py --config jobs/configs/quickstart.yaml

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python jobs/bench_ops.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
