# One command per task; CI (.ci/run) calls the same ones.
PY ?= .venv/bin/python

.PHONY: venv lint types test check real-models bench

venv:
	python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'

lint:
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m ruff format --check src tests bench scripts

types:
	$(PY) -m mypy src tests

test:
	$(PY) -m pytest

check: lint types test

# Real weights for the real-model tier (needs ../shared/models); then: MLXPOOL_REAL_MODELS=models make test
real-models:
	bash ../shared/models/fetch_real_weights.sh models $(PY)
