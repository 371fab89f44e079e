# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# Installed before everything else so pip never pulls a CUDA build; override for GPU machines.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test demo toy-assets clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python -m saemnesia.demo

# Regenerates the shipped ToyCanvas assets (saemnesia/toy/assets/) from their configs; its wall time is in
# docs/toycanvas.md. The VAE and the text-to-image model train in two DDP processes of one thread each; the
# classifiers (one thread, which fixes their numerics) train beside the VAE, and both must succeed.
toy-assets: setup
	OMP_NUM_THREADS=1 $(BIN)/python cli.py fit -c configs/toy/toy_classifiers.yaml & classifiers=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/python cli.py fit -c configs/toy/toy_vae.yaml && wait $$classifiers
	OMP_NUM_THREADS=1 $(BIN)/python cli.py fit -c configs/toy/toy_model.yaml
	$(BIN)/python -m saemnesia.toy.quality

clean:
	rm -rf runs .pytest_cache
