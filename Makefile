# dsmoe: the everyday commands. `make help` lists them.
PY ?= python3

.PHONY: help install test train resume bench bench-gpu lint

help:
	@echo "install  pip install the CPU build of torch (no CUDA downloads), then dsmoe with its dev extras"
	@echo "test     run the test suite (CPU, gloo multi-process tests included)"
	@echo "train    train the tiny MoE on the bundled tiny-Shakespeare corpus (CPU, ~3 min);"
	@echo "         RUN=FILE another run file, ARGS=\"--train.steps=600 ...\" config overrides"
	@echo "resume   continue that run from its newest checkpoint (after Ctrl-C; the same RUN= and ARGS=)"
	@echo "bench    the benchmark suite (quick preset; results in the ignored benchmarks/results/local/,"
	@echo "         RECORD=1: in benchmarks/results/ to commit)"
	@echo "bench-gpu  the GPU suite on one H100/H200, <= 8 min (docs/gpu.md; --cpu runs it on the CPU)"
	@echo "lint     ruff over the package, launchers, benchmarks and tests"

install:
	$(PY) -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -e ".[dev]"

test:
	$(PY) -m pytest

RUN ?= configs/runs/tiny-shakespeare.yaml
# what the run prints as its resume command (`--resume auto` is not a make argument)
RESUME_CMD = make resume$(if $(filter-out configs/runs/tiny-shakespeare.yaml,$(RUN)), RUN=$(RUN))$(if $(ARGS), ARGS='$(ARGS)')
# status 75 = stopped on request (Ctrl-C) with a checkpoint: not a failure. The recipe's shell outlives
# Ctrl-C (`trap : INT`; the run gets the default handler back) to read the run's status.
TRAIN = trap : INT; DSMOE_RESUME_COMMAND="$(RESUME_CMD)" $(PY) launch/train.py --config $(RUN) $(ARGS)
STOPPED = rc=$$?; if [ $$rc -eq 75 ]; then echo "stopped with a checkpoint: $(RESUME_CMD) continues the run"; \
	exit 0; fi; exit $$rc

train:
	@echo "$(PY) launch/train.py --config $(RUN) $(ARGS)"; $(TRAIN); $(STOPPED)

resume:
	@echo "$(PY) launch/train.py --config $(RUN) $(ARGS) --resume auto"; $(TRAIN) --resume auto; $(STOPPED)

bench:
	DSMOE_RECORD=$(RECORD) $(PY) benchmarks/suite.py --quick

bench-gpu:  # ARGS="--out DIR" etc. go to benchmarks/gpu_suite.py
	DSMOE_RECORD=1 PYTHONPATH=. $(PY) benchmarks/gpu_suite.py $(ARGS)

lint:
	$(PY) -m ruff check dsmoe launch benchmarks tests
