# Two entry points (see README): `make demo` and `make test`. Both set up .venv from scratch if needed.
PY ?= python3.11
VENV := .venv
TORCH_PIN := "torch==2.13.0+cpu"

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_PIN)
	$(VENV)/bin/pip install -q $(TORCH_PIN) -e ".[dev]"
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/scpermut demo --out runs/demo --workers 2

test: install
	$(VENV)/bin/python -m pytest -q --durations=15 tests
