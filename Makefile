# Two entry points, each creating the environment it needs on a fresh machine.
#   make demo   run the embedded default what-if (table + plots in out/); no torch needed
#   make test   run the whole test suite (what .ci/run calls), torch executor included
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.planner: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# torch first and pinned: this resolves to the local CPU wheel; an unpinned
# torch would pull the registry's CUDA build.
$(VENV)/.test: pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,executor]'
	touch $@

demo: $(VENV)/.planner
	$(VENV)/bin/ditplan whatif

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) out .pytest_cache
