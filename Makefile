# `make demo` and `make test` set everything up on a fresh machine: a .venv with the pinned
# torch/torchvision, then vlmtune and its pinned dependencies (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmtune-installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	VLMTUNE=$(VENV)/bin/vlmtune bash scripts/demo.sh

test: install
	$(PY) -m pytest -q

clean:
	rm -rf outputs .pytest_cache
