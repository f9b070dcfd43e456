# Every target creates .venv and installs the project into it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean

# two pytest-xdist workers, one torch thread each (tests/conftest.py). A module fixture may be built on both workers:
# --dist loadgroup would keep its tests together, but pytest-xdist 3.8 cannot rename node ids under pytest 9
PYTEST := $(PY) -m pytest -q --durations=15 -n 2

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

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
