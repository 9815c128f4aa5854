# Two entry points, each setting up its own virtualenv with pip on a fresh machine:
#   make demo   pretrain CLoVE on the built-in procedural data, export, load through timm, print the probe scores
#   make test   run the test suite (make test-slow for the slow tests too)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1: a matching pair (see README, "Which torch").
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow lint

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m training.demo

test: $(VENV)/.installed
	$(PY) -m pytest

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
