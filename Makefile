# `make train` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train sample test test-fast lint clean

# setuptools announces every editable install whose package maps a folder (configs/ -> ddpm.configs):
# a notice about editable installs in general, silenced; its packaging warnings are not.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/ddpm-train $(ARGS)

# make sample CKPT=runs/<run>/checkpoints/last.pt
sample: $(STAMP)
	$(BIN)/ddpm-sample ckpt=$(CKPT) $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -n auto --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/pytest -n auto --dist loadgroup -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
