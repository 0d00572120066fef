# One-command entry points. `make run` and `make test` work on a fresh machine
# with only Python 3.11+: they create .venv and install pinned versions.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup run test test-slow lint format bench bench-torch clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)  ## the main job: running-average regression on generated data
	$(PY) train.py --task=running_average $(ARGS)

lint: $(STAMP)  ## what .pre-commit-config.yaml runs too
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The fast suite runs in TEST_WORKERS processes (pytest-xdist), a test file per
# process at a time (its module fixtures run once): on the 2-core machine, 7 minutes
# against 10 in one (cold compilation caches). TEST_WORKERS=0: in one process.
TEST_WORKERS ?= 2

test: lint  ## lint + the fast test suite
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-slow: $(STAMP)  ## long tests (targets, end-to-end studies)
	$(PY) -m pytest -q -m slow $(ARGS)

bench: $(STAMP)  ## speed measurements (results go in BENCHMARKS.md)
	$(PY) benchmarks/recurrent_layers.py
	$(PY) benchmarks/time_to_target.py

# The same benchmarks with a PyTorch reference column, from a separate venv:
# PyTorch is never a dependency of the project.
bench-torch: $(STAMP)
	test -x .bench-venv/bin/python || $(PYTHON) -m venv .bench-venv
	.bench-venv/bin/python -m pip install --quiet -c constraints.txt -e . torch==2.13.0
	.bench-venv/bin/python benchmarks/recurrent_layers.py
	.bench-venv/bin/python benchmarks/time_to_target.py
	.bench-venv/bin/python benchmarks/study_executor.py --grids rnn_activation --modes process,in-process,packed,packed-2w,torch

clean:
	rm -rf $(VENV) .bench-venv .pytest_cache .ruff_cache
