# dsmoe: the everyday commands. `make help` lists them.
PY ?= python3

.PHONY: help install test train bench bench-gpu lint

help:
	@echo "install  pip install the CPU build of torch (no CUDA downloads), then dsmoe with its dev extras"
	@echo "test     run the test suite (CPU, gloo multi-process tests included)"
	@echo "train    train the tiny MoE on the bundled tiny-Shakespeare corpus (CPU, ~3 min)"
	@echo "bench    the benchmark suite (quick preset; results in the ignored benchmarks/results/local/,"
	@echo "         RECORD=1: in benchmarks/results/ to commit)"
	@echo "bench-gpu  the GPU suite on one H100/H200, <= 8 min (docs/gpu.md; --cpu runs it on the CPU)"
	@echo "lint     ruff over the package, launchers, benchmarks and tests"

install:
	$(PY) -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -e ".[dev]"

test:
	$(PY) -m pytest

train:
	$(PY) launch/train.py --config configs/runs/tiny-shakespeare.yaml

bench:
	DSMOE_RECORD=$(RECORD) $(PY) benchmarks/suite.py --quick

bench-gpu:  # ARGS="--out DIR" etc. go to benchmarks/gpu_suite.py
	DSMOE_RECORD=1 PYTHONPATH=. $(PY) benchmarks/gpu_suite.py $(ARGS)

lint:
	$(PY) -m ruff check dsmoe launch benchmarks tests
