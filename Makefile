# One command per task; CI (.ci/run) calls the same ones.
PY ?= .venv/bin/python

.PHONY: venv lint types test check real-models bench litellm

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

# The LiteLLM proxy that tests/test_litellm.py puts in front of mlxpool, in its own venv (its pins are older than ours)
litellm:
	python3 -m venv .venv-litellm && .venv-litellm/bin/pip install -q -r tests/litellm-requirements.txt

# Real weights for the real-model tier (needs ../shared/models); then: MLXPOOL_REAL_MODELS=models make test
real-models:
	bash ../shared/models/fetch_real_weights.sh models $(PY)
