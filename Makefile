# Everything installs into .venv on first use; nothing else is needed on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
ONNX_VENV := .venv-onnx
ONNX_STAMP := $(ONNX_VENV)/.installed
LAB_ARGS ?=
# JupyterLab refuses to run as root unless told; containers and CI run as root
AS_ROOT ?= $(filter 0,$(shell id -u))
LAB_ROOT := $(if $(AS_ROOT),--allow-root,)
PYTEST_ARGS ?=
# e.g. BENCH_REAL_ARGS="--models resnet50,bert_base --json real.json"; BENCH_1B_ARGS="--layers 2 --hidden 256"
BENCH_REAL_ARGS ?=
BENCH_1B_ARGS ?=
# The browser tests drive a system Chromium through Playwright (Debian's package by default).
CHROMIUM ?= /usr/bin/chromium
APT_GET ?= apt-get

# glibc hands freed memory at the top of its heap back to the OS and faults it in again on the
# next allocation; a diagnosis frees and reallocates the same large buffers many times (FP64
# convolutions unfold their input). Notebooks run with freed memory kept for reuse (bench/README.md: Allocator).
MALLOC_KEEP := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456

.PHONY: setup test-setup chromium lab test test-slow report bench bench-real bench-1b test-onnx-import clean-cache

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the CPU build; a bare requirement would pull a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

## make setup: the venv (all that lab, report and bench need); make test-setup adds the tests' browser
setup: $(STAMP)

test-setup: setup chromium

# Installed when missing if it can be (root on Debian), else the one command to run is printed and make stops.
chromium:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ -n "$(AS_ROOT)" ] && command -v $(APT_GET) >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser tests ($(APT_GET) install -y chromium)"; \
	    DEBIAN_FRONTEND=noninteractive $(APT_GET) update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq chromium >/dev/null || exit 1; \
	    [ -x "$(CHROMIUM)" ] || { echo "chromium installed, but $(CHROMIUM) is still missing: run make test CHROMIUM=/path/to/chromium" >&2; exit 1; }; \
	elif command -v $(APT_GET) >/dev/null 2>&1; then \
	    echo "The browser tests need Chromium ($(CHROMIUM) is missing). Run this once, then make test again:" >&2; \
	    echo "    sudo apt-get install -y chromium" >&2; exit 1; \
	else \
	    echo "The browser tests need Chromium ($(CHROMIUM) is missing). Install Chromium, then run:" >&2; \
	    echo "    make test CHROMIUM=/path/to/chromium" >&2; exit 1; \
	fi

## make lab: start JupyterLab on notebooks/
lab: setup
	env $(MALLOC_KEEP) $(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_ROOT) $(LAB_ARGS)

## make test: lint and the test suite but its slowest tests (under 15 minutes on 2 cores);
## make test-slow runs those (CI runs both); ONNX import has its own venv: make test-onnx-import
test: test-setup
	$(VENV)/bin/ruff check .
	COREML_LAB_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -n auto -m "not onnx_import and not slow" $(PYTEST_ARGS)

test-slow: test-setup
	COREML_LAB_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -n auto -m "slow and not onnx_import" $(PYTEST_ARGS)

## make report: execute every notebook headless, write HTML to reports/
report: setup
	env $(MALLOC_KEEP) $(PY) tools/render_notebooks.py notebooks reports

## make bench: emulator and diagnosis speed/memory ratios against a torch forward, then the real-scale set
## (bench-real alone: eleven Hugging Face architectures at full size, about an hour on 2 cores; transformers is a
## dev dependency, installed by setup); make bench-1b: the 1B-parameter decoder (needs ~24 GB, not run by bench)
bench: setup
	$(PY) bench/run.py --malloc-env "$(MALLOC_KEEP)"
	$(PY) bench/real_scale.py --malloc-env "$(MALLOC_KEEP)" $(BENCH_REAL_ARGS)

bench-real: setup
	$(PY) bench/real_scale.py --malloc-env "$(MALLOC_KEEP)" $(BENCH_REAL_ARGS)

bench-1b: setup
	env $(MALLOC_KEEP) $(PY) bench/decoder_1b.py $(BENCH_1B_ARGS)

# onnx2torch needs torchvision, which only installs beside a (large) CUDA torch build here.
$(ONNX_STAMP): pyproject.toml
	test -x $(ONNX_VENV)/bin/python || $(PYTHON) -m venv $(ONNX_VENV)
	$(ONNX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(ONNX_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(ONNX_VENV)/bin/python -m pip install --quiet -e ".[dev,onnx-import]"
	touch $(ONNX_STAMP)

## make test-onnx-import: tests of loading .onnx files through onnx2torch
test-onnx-import: $(ONNX_STAMP)
	$(ONNX_VENV)/bin/python -m pytest -m onnx_import $(PYTEST_ARGS)

clean-cache:
	$(PY) -c "from coreml_lab.convert import clear_cache; print(clear_cache(), 'cached conversions removed')"
