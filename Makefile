# The two commands of the README, and what they stand on.
#   make run    set up, then train the tiny muP model on this machine (local backend, CPU)
#   make test   set up, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
# A pinned torch: an unpinned one pulls gigabytes of CUDA wheels. CPU build on a CPU machine.
TORCH  ?= torch==2.13.0
# Without its declared dependencies: pyproject's trainer extra lists what it really imports.
STREAMING ?= mosaicml-streaming==0.13.0
BIN    := $(VENV)/bin

.PHONY: setup run test test-fast bench-startup clean

setup: $(VENV)/.fljob-installed

$(VENV)/.fljob-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[trainer,test]'
	$(BIN)/pip install --quiet --no-deps $(STREAMING)
	touch $@

run: setup
	$(BIN)/fljob submit --backend local configs/local.yaml

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: setup
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# The inner loop: unit and golden tests, no servers, no multi-second training runs (a few minutes).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --ignore=tests/integration; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench-startup: setup
	$(BIN)/python bench/startup.py

clean:
	rm -rf $(VENV) runs .pytest_cache
