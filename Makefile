# Quick start: `make demo` and `make test` each set up .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
SAM2_VERSION := 1.1.0

.PHONY: setup test demo bench clean

setup: $(STAMP)

# sam2's sdist lists torchvision and a build-time torch; SAM-2's video path needs neither, so it is installed
# without dependencies and without the CUDA extension (see README: on a GPU host a normal install works).
$(STAMP): requirements-dev.txt backend/pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	SAM2_BUILD_CUDA=0 $(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps sam2==$(SAM2_VERSION)
	$(PIP) install -q --disable-pip-version-check --no-deps -e backend
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

clean:
	rm -rf $(VENV) out
