# Batch Normalization book: build, test and refresh the notebooks.
#   make book     render the book from the stored notebook outputs -> _build/html
#   make test     lint + type check + unit tests + re-execute every chapter (nbval, 2 at once) + strict build
#                 + browser test of the built pages + Colab-style chapter run
#   make browser  install Debian's chromium for the browser test (needs root)
#   make test-book  only the book-level tests (tests_book/) on the current build
#   make execute  re-run every chapter in place to refresh its stored outputs
#   make bench    run the bnlib benchmarks
#   make device-data  MNIST gzipped into ./data, to carry to a machine without network
#   make device-run   every chapter as plain Python + the benchmarks -> results/device
#                     (tools/device_run.sh; README, "Running on a GPU")
#   make test-oldest-torch  the library's unit tests on the oldest supported torch, in a fresh venv (not in test)

#   make repository URL=https://github.com/OWNER/REPO
#                 set the book's repository (_config.yml) and rewrite every copy of it (tools/repository.py)
#   make lint-repo  actionlint on .github/workflows, CITATION.cff against the CFF 1.2.0 schema
#   make test-newest-torch  the unit tests against the newest torch on the index, bnlib from a wheel,
#                 in a fresh venv ($(NEWEST_VENV)); not part of make test
#   make clean    remove _build
# Everything runs inside .venv, which is created on first use.

PY ?= python3
VENV = .venv
BIN = $(VENV)/bin
PYTHON = $(BIN)/python
STAMP = $(VENV)/.stamp

# Deterministic notebook execution: fixed hash seed, no progress bars, one torch
# thread (the small models here run fastest on one, and stored outputs and CI agree),
# and the AVX2 code paths of ATen, oneDNN and MKL on every x86 CPU (CPU_PATHS): which
# path runs decides the rounding, and even torch.randn's numbers (ATen's default and
# AVX2 paths draw different ones from the same seed), so without it the stored outputs
# would depend on the CPU generation of the machine that wrote them.
CPU_PATHS = ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2
NB_ENV = env -u BNLIB_PROGRESS PYTHONHASHSEED=0 OMP_NUM_THREADS=1 $(CPU_PATHS)
NOTEBOOKS = $(wildcard chapters/*.ipynb)
# nbval runs this many chapters at once (pytest-xdist, one notebook per worker): one per core.
NB_JOBS ?= 2

# bash with -e/-o pipefail so that any failing command fails the target.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:

.PHONY: venv data book lint test test-book browser execute bench device-data device-run clean \
	repository lint-repo test-newest-torch test-oldest-torch

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -e .
	$(BIN)/pip download -q --no-deps -d $(VENV)/share/cff $(CFF_SCHEMA)
	touch $@

# The Citation File Format 1.2.0 schema, as shipped by this package: downloaded (not installed:
# its own requirements pin an old jsonschema) for tools/check_citation.py, which needs no network.
CFF_SCHEMA = cffconvert==2.0.0

data: $(STAMP)
	$(PYTHON) -m bnlib.lab.data

book: $(STAMP) data
	$(BIN)/jupyter-book build .

test: $(STAMP) data
	@echo "==> [1/5] lint (ruff), type check of the normalization library (mypy; both configured in pyproject.toml), then the bnlib unit tests"
	@$(BIN)/ruff check bnlib tests tests_book tools
	@$(BIN)/mypy
	@$(MAKE) --no-print-directory lint-repo
	@SECONDS=0; $(NB_ENV) $(PYTHON) -m pytest -q tests; \
	  echo "==> [1/5] unit tests passed in $${SECONDS}s"
	@echo "==> [2/5] re-executing chapters with nbval"
	@SECONDS=0; \
	if ls chapters/*.ipynb >/dev/null 2>&1; then \
	  $(NB_ENV) $(PYTHON) -m pytest -q --nbval chapters/ -n $(NB_JOBS) --dist loadfile --durations=0 \
	    --nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout=600; \
	  echo "==> [2/5] notebooks passed in $${SECONDS}s"; \
	else \
	  echo "==> [2/5] skipped: no notebooks in chapters/ yet"; \
	fi
	@echo "==> [3/5] strict book build (-W -n)"
	@SECONDS=0; $(BIN)/jupyter-book build . -W -n --keep-going; \
	  echo "==> [3/5] book built in $${SECONDS}s"
	@$(MAKE) --no-print-directory test-book

# The book as readers use it (tests_book/, see README.md): every page of
# _toc.yml in headless Chromium, then a chapter run Colab-style from a wheel in
# a fresh venv outside the repository. Needs a built book (`make book`).
test-book: $(STAMP) data browser
	@echo "==> [4/5] measured numbers in the prose are glued or cited (tests_book/test_glue.py);"
	@echo "==> [4/5] the repository URL agrees with _config.yml everywhere (tests_book/test_repository.py)"
	@$(NB_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider tests_book/test_glue.py tests_book/test_repository.py
	@echo "==> [4/5] browser test of the rendered pages"
	@SECONDS=0; BOOK_CHROMIUM=$(CHROMIUM) $(NB_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider tests_book/test_browser.py; \
	  echo "==> [4/5] browser test passed in $${SECONDS}s (screenshots in _build/screenshots)"
	@echo "==> [5/5] Colab-style run of a chapter from a fresh venv"
	@SECONDS=0; $(NB_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider tests_book/test_colab_style.py; \
	  echo "==> [5/5] Colab-style test passed in $${SECONDS}s"

# Headless Chromium for the browser test: Debian's package (CI runs as root
# on Debian). Playwright drives it; its own browser download is not used.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	echo "==> installing chromium (apt)"; SECONDS=0; \
	apt-get update -qq; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	echo "==> chromium installed in $${SECONDS}s"

execute: $(STAMP) data
	@if ! ls chapters/*.ipynb >/dev/null 2>&1; then \
	  echo "no notebooks in chapters/ to execute"; exit 0; fi; \
	SECONDS=0; \
	printf '%s\n' $(NOTEBOOKS) | $(NB_ENV) xargs -P $(NB_JOBS) -n 1 $(BIN)/jupyter-execute --inplace --timeout=900; \
	echo "==> executed $(words $(NOTEBOOKS)) notebook(s) in $${SECONDS}s"

lint: $(STAMP)
	$(BIN)/ruff check bnlib tests tests_book tools
	$(BIN)/mypy
	@$(MAKE) --no-print-directory lint-repo

# The unit tests of the normalization library on the oldest torch it supports (the floor in pyproject.toml),
# in a fresh virtual environment under /tmp with that torch from PyPI (a large download: the CUDA build and its
# libraries; TORCH_PIP_ARGS="--index-url <a CPU-only index>" fetches a smaller one). Not part of `make test`.
# Tests marked recent_torch compare with what only later releases do (torch.nn's bias= keyword and eps checks,
# torch.compile of the fast path) and are left out.
# OLDEST_PY must be a Python that release has wheels for (3.10 to 3.12).
OLDEST_TORCH ?= 2.3.1
OLDEST_PY ?= $(PY)
OLDEST_VENV ?= /tmp/bnlib-oldest-torch
TORCH_PIP_ARGS ?=
OLDEST_TESTS = tests/test_batchnorm.py tests/test_bn_parity.py tests/test_fastpath.py tests/test_closed_form.py \
	tests/test_edges.py tests/test_variants.py tests/test_fold.py tests/test_frozen.py tests/test_recurrent.py \
	tests/test_running_stats.py tests/test_layers.py tests/test_distributed.py
test-oldest-torch:
	@echo "==> unit tests of the normalization library on torch $(OLDEST_TORCH) ($(OLDEST_VENV))"
	rm -rf $(OLDEST_VENV)
	$(OLDEST_PY) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q $(TORCH_PIP_ARGS) "torch==$(OLDEST_TORCH)"
	$(OLDEST_VENV)/bin/pip install -q "numpy<2" matplotlib tqdm pytest
	$(OLDEST_VENV)/bin/pip install -q --no-deps -e .
	cd $(OLDEST_VENV) && $(OLDEST_VENV)/bin/python -c 'import torch, bnlib; print("torch", torch.__version__, "bnlib from", bnlib.__file__)'
	$(NB_ENV) $(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not recent_torch" $(OLDEST_TESTS)

# The repository's own files: the workflows (actionlint, pinned in requirements.txt; shellcheck
# and pyflakes integrations off, so that the result does not depend on what else is installed)
# and CITATION.cff (tools/check_citation.py, offline).
lint-repo: $(STAMP)
	@$(BIN)/actionlint -no-color -shellcheck= -pyflakes= .github/workflows/*.yml
	@echo "actionlint $$($(BIN)/actionlint -version | head -1 | awk '{print $$NF}'): .github/workflows/*.yml clean"
	@$(PYTHON) tools/check_citation.py

# One setting: _config.yml's repository.url; every copy of it is rewritten (tools/repository.py).
# Standard library only: runs before any venv exists.
repository:
	@$(PY) tools/repository.py "$(URL)"

# The unit tests against the newest torch on the package index, with bnlib installed from a wheel
# built from this checkout, in a fresh venv (removed first). `python -P` keeps the checkout off
# sys.path, so the tests import the installed bnlib. TORCH (default: the newest release) and
# PIP_ARGS (e.g. another index) pass through to pip. README, "The newest torch".
NEWEST_VENV ?= /tmp/bnlib-newest-torch
TORCH ?= torch
test-newest-torch: data
	rm -rf $(NEWEST_VENV)
	$(PY) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/pip wheel -q --no-deps -w $(NEWEST_VENV)/wheels .
	$(NEWEST_VENV)/bin/pip install -q $(PIP_ARGS) --upgrade "$(TORCH)" numpy matplotlib tqdm pytest keras \
	  $(NEWEST_VENV)/wheels/bnlib-*.whl
	@$(NEWEST_VENV)/bin/python -P -c 'import bnlib, sys, torch; \
	  assert sys.prefix in bnlib.__file__, bnlib.__file__; \
	  print(f"==> torch {torch.__version__}, bnlib from {bnlib.__file__}")'
	@SECONDS=0; $(NB_ENV) $(NEWEST_VENV)/bin/python -P -m pytest -q -p no:cacheprovider tests; \
	  echo "==> unit tests passed on torch $$($(NEWEST_VENV)/bin/python -c 'import torch; print(torch.__version__)') in $${SECONDS}s"

bench: $(STAMP)
	$(PYTHON) -m bnlib.lab.bench

# The four MNIST files, gzipped (11 MB), in ./data (git-ignored): what a machine with no network
# needs besides the repository (BNLIB_DATA=./data). Checked again when loaded.
device-data: $(STAMP) data
	@mkdir -p data; root=$$($(PYTHON) -c 'from bnlib.lab.data import default_root; print(default_root())'); \
	for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \
	  if [ -f "$$root/$$f" ]; then gzip -9nc "$$root/$$f" > data/$$f.gz; else cp "$$root/$$f.gz" data/; fi; done; \
	BNLIB_DATA=data $(PYTHON) -m bnlib.lab.data

# Dress rehearsal of the GPU run on this machine (JOBS chapters at once; default 2 here).
device-run: $(STAMP) device-data
	$(NB_ENV) JOBS=$${JOBS:-2} BUDGET=$${BUDGET:-3600} OUT=$${OUT:-results/device} PYTHON=$(abspath $(PYTHON)) \
	  bash tools/device_run.sh 900

clean:
	rm -rf _build
