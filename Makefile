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
	$(PY) -m pytest -q backend/tests Testing

demo: setup
	$(PY) -m medsam2_backend.cli demo --out out/demo

bench: setup
	$(PY) backend/bench/bench.py $(if $(FULL),--full,)

clean:
	rm -rf $(VENV) out
