# Batch Normalization book: build, test and refresh the notebooks.
#   make book     render the book from the stored notebook outputs -> _build/html
#   make test     unit tests + re-execute every chapter (nbval) + strict build
#   make execute  re-run every chapter in place to refresh its stored outputs
#   make bench    run the bnlib benchmarks
#   make clean    remove _build
# Everything runs inside .venv, which is created on first use.

PY ?= python3
VENV = .venv
BIN = $(VENV)/bin
PYTHON = $(BIN)/python
STAMP = $(VENV)/.stamp

# Deterministic notebook execution: fixed hash seed, no progress bars.
NB_ENV = env -u BNLIB_PROGRESS PYTHONHASHSEED=0
NOTEBOOKS = $(wildcard chapters/*.ipynb)

# bash with -e/-o pipefail so that any failing command fails the target.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:

.PHONY: venv data book test execute bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -e .
	touch $@

data: $(STAMP)
	$(PYTHON) -m bnlib.data

book: $(STAMP) data
	$(BIN)/jupyter-book build .

test: $(STAMP) data
	@echo "==> [1/3] bnlib unit tests"
	@SECONDS=0; $(PYTHON) -m pytest -q tests; \
	  echo "==> [1/3] unit tests passed in $${SECONDS}s"
	@echo "==> [2/3] re-executing chapters with nbval"
	@SECONDS=0; \
	if ls chapters/*.ipynb >/dev/null 2>&1; then \
	  $(NB_ENV) $(PYTHON) -m pytest -q --nbval chapters/ \
	    --nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout=600; \
	  echo "==> [2/3] notebooks passed in $${SECONDS}s"; \
	else \
	  echo "==> [2/3] skipped: no notebooks in chapters/ yet"; \
	fi
	@echo "==> [3/3] strict book build (-W -n)"
	@SECONDS=0; $(BIN)/jupyter-book build . -W -n --keep-going; \
	  echo "==> [3/3] book built in $${SECONDS}s"

execute: $(STAMP) data
	@if ! ls chapters/*.ipynb >/dev/null 2>&1; then \
	  echo "no notebooks in chapters/ to execute"; exit 0; fi; \
	SECONDS=0; \
	$(NB_ENV) $(BIN)/jupyter-execute --inplace --timeout=900 $(NOTEBOOKS); \
	echo "==> executed $(words $(NOTEBOOKS)) notebook(s) in $${SECONDS}s"

bench: $(STAMP)
	$(PYTHON) -m bnlib.bench

clean:
	rm -rf _build
