# Two entry points, each creating the environment it needs on a fresh machine.
#   make demo   run the embedded default what-if (table + plots in out/)
#   make test   run the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ditplan whatif

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) out .pytest_cache
