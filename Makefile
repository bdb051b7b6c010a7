# GenQ developer commands. `make test` is what CI runs (.ci/run).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install lint test test-all bench-quant example demo clean

install:
	scripts/install.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --runslow

bench-quant: install
	$(BIN)/python benchmarks/quant_engine.py

# GenQ end to end on CPU with tiny models (a random tiny diffusion model, the benchmark's BN CNN)
example: install
	$(BIN)/python -m genq_core.generate.tiny runs/tiny-sd
	$(BIN)/genq run examples/fashion_tiny.yaml --out runs/fashion-tiny

# The product's main job on the embedded service (genq serve --embedded): see scripts/demo.sh
demo: install
	scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
