# make demo : install into .venv and run the built-in end-to-end demo (CPU, < 3 minutes)
# make test : install into .venv and run the test suite (real-data tests use EDGEC_DATA)
# make drift: a fresh venv with the NEWEST versions pyproject's ranges allow (no constraints), then the
#             suite: run it on a schedule to see a breaking release before users install it
# make lock : rewrite constraints.txt from the .venv (after `make drift` passed with newer versions)
# Installs use constraints.txt, the exact versions CI passed with (a fresh clone gets what was tested).
VENV ?= .venv
DRIFT_VENV ?= .venv-drift
CONSTRAINTS := constraints.txt
PY := $(VENV)/bin/python
EDGEC_DATA ?= $(abspath ../shared/data)

.PHONY: install demo test bench-cifar10 drift lock
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel; a torch range admitting 2.14+ would pull a multi-GB CUDA build
	$(PY) -m pip install -q -c $(CONSTRAINTS) "torch==2.13.0"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	# reference attacks the tests compare edgec.attacks with; --no-deps: its torchvision requirement
	# is metadata only (never imported), and torchvision does not load beside the CPU torch
	$(PY) -m pip install -q --no-deps "torchattacks==3.5.1"
	touch $@

demo: install
	$(VENV)/bin/edgec demo

test: install
	EDGEC_DATA=$(EDGEC_DATA) $(PY) -m pytest -q

bench-cifar10: install
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[nncf]"
	EDGEC_DATA=$(EDGEC_DATA) $(PY) benchmarks/cifar10_int8.py

drift:
	rm -rf $(DRIFT_VENV)
	python3 -m venv $(DRIFT_VENV)
	$(DRIFT_VENV)/bin/python -m pip install -q --upgrade pip
	# newest allowed torch (the range stops below the CUDA-only 2.14), then everything else, eagerly upgraded
	$(DRIFT_VENV)/bin/python -m pip install -q "torch>=2.4,<2.14"
	$(DRIFT_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
	$(DRIFT_VENV)/bin/python -m pip install -q --no-deps "torchattacks==3.5.1"
	@echo "versions that differ from $(CONSTRAINTS):"
	@$(DRIFT_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -vxF -f $(CONSTRAINTS) || true
	EDGEC_DATA=$(EDGEC_DATA) $(DRIFT_VENV)/bin/python -m pytest -q

lock: install
	{ sed -n '/^#/p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
