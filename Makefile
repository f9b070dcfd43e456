# Every target creates .venv and installs the project into it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast durations lint clean

# two pytest-xdist workers, one torch thread each, each taking whole test modules (a module fixture is built once)
# in the order tests/conftest.py gives them: the longest first by tests/durations.txt
PYTEST := $(PY) -m pytest -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nas-split compare --config benchmarks/configs/digits_demo.yaml

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)  # the edit loop: everything but the tests marked slow
	$(PYTEST) -m "not slow"

durations: $(STAMP)  # measure every test again: tests/durations.txt (the slow marks and the workers' order)
	$(PYTEST) --durations=0 > $(VENV)/durations.log
	$(PY) tests/durations.py < $(VENV)/durations.log

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
