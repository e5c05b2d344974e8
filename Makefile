# Quick start: `make demo` and `make test` each set up .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
SAM2_VERSION := 1.1.0

.PHONY: setup test demo bench bench-batch screenshot clean

setup: $(STAMP)

# sam2's sdist lists torchvision and a build-time torch; SAM-2's video path needs neither, so it is installed
# without dependencies and without the CUDA extension (see README: on a GPU host a normal install works).
# nilearn is installed for its data files only (the MNI152 T1 and grey/white matter maps the batch tests use).
$(STAMP): requirements-dev.txt backend/pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	SAM2_BUILD_CUDA=0 $(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps sam2==$(SAM2_VERSION)
	$(PIP) install -q --disable-pip-version-check --no-deps -e backend
	$(PIP) install -q --disable-pip-version-check --no-deps nilearn==0.14.1
	touch $(STAMP)

test: setup
	$(PY) -m pytest --durations=15

# The Slicer-side path headless (slicer-core): local server, RAS box, propagation, .seg.nrrd + PNG montage.
demo: setup
	PYTHONPATH=MedSAM2Slicer $(PY) -m MedSAM2SlicerLib.demo --out out/demo $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),)

# Engine vs SAM-2's own pipeline, then upload and prompt latency through client + server. FULL=1: 512x512x300.
bench: setup
	$(PY) backend/bench/bench.py $(if $(FULL),--full,)
	$(PY) backend/bench/bench_server.py

# Cohort throughput: Ray with 1 and 2 workers against the single-process loop with 1 and 2 threads.
bench-batch: setup
	$(PY) backend/bench/bench_batch.py

# The Extensions Index screenshot (Resources/Screenshots), rendered offscreen from the deterministic test engine.
screenshot: setup
	$(PY) Utilities/render_screenshot.py

clean:
	rm -rf $(VENV) out
