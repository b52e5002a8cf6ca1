# Two entry points: `make demo` (the sandbox cluster replicating on schedule) and `make test`.
SHELL := /bin/bash
VENV := .venv/bin

.PHONY: setup demo down test lint bench

setup:
	@scripts/setup.sh

demo: setup
	@scripts/demo.sh

down: setup
	@$(VENV)/replq sandbox down

test: setup
	@$(VENV)/ruff check .
	@$(VENV)/python -m pytest -q

lint: setup
	@$(VENV)/ruff check .

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(VENV)/python $$b || exit 1; done
