# Two commands for a newcomer (see README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= out/demo

.PHONY: install demo test lint bench-field clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# the CPU build of torch first (a GPU machine can install the CUDA build instead)
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/qsmprep demo $(OUT)

lint: install
	$(VENV)/bin/ruff check qsmprep tests
	$(VENV)/bin/ruff format --check qsmprep tests

test: install lint
	$(PY) -m pytest -n 2 tests

bench-field: install
	$(VENV)/bin/qsmprep-bench field

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
