# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# Installed before everything else so pip never pulls a CUDA build; override for GPU machines.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup eval test demo toy-assets clean

# The torch just installed, pinned for every later install: no dependency may swap it for another build.
KEEP_TORCH := $(VENV)/keep-torch.txt

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"

$(KEEP_TORCH): $(BIN)/python
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $@

$(VENV)/.installed: $(KEEP_TORCH) pyproject.toml
	$(BIN)/pip install -c $(KEEP_TORCH) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# timm for the published ViT classifiers (optional: saemnesia/classifiers.py has a plain-torch copy). It pulls
# torchvision, which must be the build matching torch: give it where the index has one, e.g.
# `make eval TORCHVISION_SPEC="torchvision==0.28.0+cpu"`.
eval: setup
	$(BIN)/pip install -c $(KEEP_TORCH) -e ".[dev,eval]" $(TORCHVISION_SPEC)

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
