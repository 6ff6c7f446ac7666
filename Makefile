# The two commands README promises: `make demo` and `make test`. Both do all set-up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp
export MAX_JOBS ?= 2
export HF_HUB_OFFLINE := 1

.PHONY: test demo build bench bench-mergekit cuda-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

# In-place build so the tests import the tree they sit in (no editable install to go stale).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest

demo: build
	$(PY) -m pymerge demo

# Every benchmark in its quick form (results and full commands: bench/README.md).
bench: build
	PYTHONPATH=. $(PY) bench/merge_ops.py --quick
	PYTHONPATH=. $(PY) bench/fisher.py --quick
	PYTHONPATH=. $(PY) bench/mask_fisher.py --quick
	PYTHONPATH=. $(PY) bench/stats.py --quick
	PYTHONPATH=. $(PY) bench/engine.py --quick
	PYTHONPATH=. $(PY) bench/mats.py --quick

# Compiles every CUDA source with plain nvcc (they are torch-free), as CI does where nvcc exists.
cuda-check:
	bash tools/cuda_check.sh

clean:
	rm -rf build pymerge/*.so

# pymerge and mergekit (pinned, in its own venv under build/) on the same generated models: equality on tiny
# Llama models, wall time and peak RSS on ~1B bf16 ones (slow; not part of make test). Results: bench/README.md.
bench-mergekit: build
	PYTHONPATH=. $(PY) bench/vs_mergekit.py
