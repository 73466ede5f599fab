# make demo : install into .venv and run the built-in end-to-end demo (CPU, < 3 minutes)
# make test : install into .venv and run the test suite (real-data tests use EDGEC_DATA)
VENV ?= .venv
PY := $(VENV)/bin/python
EDGEC_DATA ?= $(abspath ../shared/data)

.PHONY: install demo test bench-cifar10
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel; a torch range admitting 2.14+ would pull a multi-GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	# reference attacks the tests compare edgec.attacks with; --no-deps: its torchvision requirement
	# is metadata only (never imported), and torchvision does not load beside the CPU torch
	$(PY) -m pip install -q --no-deps "torchattacks==3.5.1"
	touch $@

demo: install
	$(VENV)/bin/edgec demo

test: install
	EDGEC_DATA=$(EDGEC_DATA) $(PY) -m pytest -q

bench-cifar10: install
	$(PY) -m pip install -q -e ".[nncf]"
	EDGEC_DATA=$(EDGEC_DATA) $(PY) benchmarks/cifar10_int8.py
