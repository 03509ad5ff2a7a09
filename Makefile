# Two commands for a newcomer (see README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= out/demo
LINTED  = qsmprep tests workflows tools docs/conf.py

.PHONY: install demo test lint docs container-check bench-field clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# the CPU build of torch first (a GPU machine can install the CUDA build instead)
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test,docs,templates]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/qsmprep demo $(OUT)

lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	# the layers of the package ([tool.importlinter] in pyproject.toml)
	$(VENV)/bin/lint-imports

# the documentation site (docs/_build/html); warnings are errors
docs: install
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

test: install lint docs
	$(PY) -m pytest -n 2 tests

# build the Dockerfile with podman and run the demo inside it (root; see tools/container_check.sh)
container-check:
	bash tools/container_check.sh

bench-field: install
	$(VENV)/bin/qsmprep-bench field

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache docs/_build docs/_generated
