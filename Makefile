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
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
PYTEST_ARGS ?=

# glibc hands freed memory at the top of its heap back to the OS and faults it in again on the
# next allocation; a diagnosis frees and reallocates the same large buffers many times (FP64
# convolutions unfold their input). Notebooks run with freed memory kept for reuse (README: Speed).
MALLOC_KEEP := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456

.PHONY: setup lab test report bench test-onnx-import clean-cache

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the CPU build; a bare requirement would pull a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## make lab: start JupyterLab on notebooks/
lab: setup
	env $(MALLOC_KEEP) $(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_ROOT) $(LAB_ARGS)

## make test: the whole test suite (ONNX import has its own venv: make test-onnx-import)
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n auto -m "not onnx_import" $(PYTEST_ARGS)

## make report: execute every notebook headless, write HTML to reports/
report: setup
	env $(MALLOC_KEEP) $(PY) tools/render_notebooks.py notebooks reports

## make bench: emulator and diagnosis speed/memory ratios against a torch forward
bench: setup
	$(PY) bench/run.py --malloc-env "$(MALLOC_KEEP)"

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
