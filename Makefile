# `make test` and `make demo` do all set-up from nothing: a virtual environment in .venv,
# torch from the local CPU wheel (never the registry's CUDA build), then this package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.aiockpt-installed

.PHONY: test lint typecheck unit demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# Every package is pinned in constraints.txt, so a release elsewhere never changes what a
	# fresh clone runs. torch goes first, on its own, so that installing the project never
	# resolves torch itself (the registry's CUDA build is several GB).
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt "$(TORCH_PIN)"
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check aiockpt tests benchmarks examples
	$(BIN)/ruff format --check aiockpt tests benchmarks examples
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint unit

demo: $(STAMP)
	$(BIN)/python -m examples.demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_channel

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
