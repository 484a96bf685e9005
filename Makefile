# Two commands do all the set-up on a fresh machine:
#   make run   -- the main job on the embedded default (CPU, ONNX Runtime)
#   make test  -- the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench clean

$(STAMP): pyproject.toml constraints/dev.txt constraints/serve.txt
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else f"the locked install needs Python >= 3.11 (the lock files pin wheels 3.10 has none of); $(PYTHON) is {v.major}.{v.minor}: make $(MAKECMDGOALS) PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/dev.txt -c constraints/serve.txt -e '.[build,dev]'
	touch $(STAMP)

# The main job: train the demo CNN as an INN, build its tiers (ONNX Runtime on the CPU),
# then serve them on 127.0.0.1:8001 (gRPC; REST on :8000, metrics on :8002) until Ctrl-C. The model repository
# is runs/demo/repository; a second `make run` reuses the INN trained there and rebuilds
# only what changed, so it serves within seconds. Start over: `make run RETRAIN=1` (or
# `rm -rf runs/demo`).
run: $(STAMP)
	$(VENV)/bin/innfer demo$(if $(RETRAIN), --retrain)
	$(VENV)/bin/innfer serve --repository runs/demo/repository --http-port 8000

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m bench.conversion

clean:
	rm -rf $(VENV) build *.egg-info
