# Set-up and the two README commands. torch is pinned HERE (a local CPU wheel), not in pyproject:
# users with GPUs bring their own torch build.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN = $(VENV)/bin

.PHONY: demo test bench install clean reproduce docs-presets

$(BIN)/normscope: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)   # first, or pip pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/normscope

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/normscope demo --out normscope-demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Retrains every RL run of the digits model from the shipped base and regenerates results.json, the README's
# tables and the figures (examples/digits/README.md states its CPU time).
reproduce: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m examples.digits.reproduce

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_compare.py

# The preset tables of docs/presets.md and docs/models.md, from the Preset rows (tests/test_presets_sources.py
# compares them).
docs-presets: install
	$(BIN)/python -m normscope.render.presets docs

clean:
	rm -rf $(VENV) normscope-demo *.egg-info
