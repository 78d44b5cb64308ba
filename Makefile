# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing and
# install the pinned set once; the stamp is keyed on the pins, so a second run installs nothing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PINS := requirements/torch.txt requirements/torchrec.txt requirements/lock.txt requirements/constraints.txt pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(PINS) | sha256sum | cut -c1-16)
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
TEST_ARGS ?=

.PHONY: install demo test lint typecheck format bench bench-experts bench-serving bench-census bench-distributed bench-pipelines bench-history-units bench-threads bench-reference bench-cold-start bench-synthetic lock clean help

help:
	@echo "make demo          synthetic data -> pipeline -> MMoE -> MLflow, end to end"
	@echo "make test          lint, types, then the whole test suite"
	@echo "make format        apply the formatter and the linter's fixes"
	@echo "make bench         all benchmarks (writes benchmarks/results/)"
	@echo "make bench-experts the fused/routed expert kernels against a loop and torch.mm"
	@echo "make bench-serving batch scoring rows/s; online /v1/rank latency vs mlflow models serve"
	@echo "make bench-census  the MMoE paper's census-income comparison"
	@echo "make bench-distributed  sharded training on 1 vs 2 ranks, memory per rank, TBE vs nn.EmbeddingBag"
	@echo "make bench-pipelines    history features on 10M events: Polars vs pandas; AUC with and without"
	@echo "make bench-history-units  history features of 100M events in units of work (~20 min with generation)"
	@echo "make bench-threads      training beside a busy process: the thread governor vs fixed counts"
	@echo "make bench-reference    the project's MMoE vs a plain-PyTorch MMoE on census (train, infer, neighbour)"
	@echo "make bench-cold-start   a time-split ratings log with mostly new test users: models vs baselines, AUC and GAUC"
	@echo "make bench-synthetic    the MMoE paper's synthetic regression: no seed leaves a task stuck"

install: $(STAMP)

$(STAMP): $(PINS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned set into $(VENV) (first run only)..."
	$(PIP) install pip==25.3
	$(PIP) install -r requirements/torch.txt
	$(PIP) install --no-deps -r requirements/torchrec.txt
	$(PIP) install -r requirements/lock.txt -c requirements/constraints.txt
	$(PIP) install --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(BIN)/recsys-moe demo

test: lint typecheck
	$(BIN)/python -m pytest $(TEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: bench-experts bench-serving bench-census bench-distributed bench-pipelines bench-history-units bench-threads bench-reference bench-cold-start bench-synthetic

bench-experts: $(STAMP)
	$(BIN)/python benchmarks/experts.py

bench-serving: $(STAMP)
	$(BIN)/python benchmarks/serving_speed.py

bench-census: $(STAMP)
	$(BIN)/python benchmarks/census.py

bench-distributed: $(STAMP)
	$(BIN)/python benchmarks/distributed.py

bench-pipelines: $(STAMP)
	$(BIN)/python benchmarks/history_features.py

bench-history-units: $(STAMP)
	$(BIN)/python benchmarks/history_features.py --partitioned

bench-threads: $(STAMP)
	$(BIN)/python benchmarks/threads.py

bench-reference: $(STAMP)
	$(BIN)/python benchmarks/reference.py

bench-cold-start: $(STAMP)
	$(BIN)/python benchmarks/cold_start.py

bench-synthetic: $(STAMP)
	$(BIN)/python benchmarks/mmoe_synthetic.py

lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(torch|torchrec|fbgemm-gpu-cpu)==' > requirements/lock.txt

clean:
	rm -rf $(VENV) demo runs mlruns.db mlartifacts .pytest_cache .mypy_cache .ruff_cache
