# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject.toml): this version is the CPU wheel available offline.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint docs clean gpu-check gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# --force: a second `make demo` replaces the first one's files in runs/demo (and nothing else there).
demo: setup
	$(BIN)/amft-vlm demo --out runs/demo --force

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.run

lint: setup
	$(BIN)/ruff check .

# docs/settings.md from the config's field docstrings and the methods table (a test fails while it is stale).
docs: setup
	$(BIN)/python -m amft_vlm.settings_docs docs/settings.md

# On a CUDA machine without network, with torch/transformers/accelerate preinstalled: install the small
# wheels carried in .gpu-wheels/ (made here by `make gpu-wheels`), then run the check (exits non-zero on failure).
gpu-check:
	-$(PYTHON) -m pip install --quiet --no-index --find-links .gpu-wheels gymnasium pillow
	@$(PYTHON) -c "import gymnasium, PIL, torch, transformers, accelerate" || { echo "gpu-check: a package is missing (make gpu-wheels here, carry .gpu-wheels/)"; exit 1; }
	PYTHONPATH=. $(PYTHON) -m scripts.gpu_check

gpu-wheels: setup
	$(BIN)/pip download --quiet --dest .gpu-wheels --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 gymnasium pillow

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
