# facesvc: the two commands most people need are `make run` and `make test`.
# Every target installs what it needs (virtual environment, dependencies,
# generated gRPC stubs, model weights) and is a no-op when already done.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BUF_VERSION := 1.75.0
BUF    := .tools/node_modules/.bin/buf
PROTOS := $(wildcard protos/facesvc/v1/*.proto)
CONTRACT_BASELINE := contract/v0.2.0
ARGS   ?=

.PHONY: help setup run test lint lint-proto gen models install-gpu bench bench-search eval clean

help:
	@echo "make run        set everything up and start the server on embedded defaults"
	@echo "make test       set everything up, lint (buf lint + buf breaking, ruff) and run the whole test suite"
	@echo "make setup      venv, dependencies, generated stubs, model weights"
	@echo "make bench      scripts/bench_pipeline.py (per-stage and end-to-end latency)"
	@echo "make bench-search  scripts/bench_search.py (hnswlib vs FAISS flat / HNSW; ARGS=--size 1000000 for 1 M)"
	@echo "make eval       scripts/eval_verification.py (threshold calibration on labelled pairs)"
	@echo "make install-gpu  swap CPU onnxruntime for onnxruntime-gpu in the venv"

setup: $(VENV)/.stamp-install facesvc/.stamp-gen models

# Dependencies. `compat` editable mode puts the repo root on sys.path, so the
# generated `facesvc` package and later regenerations are importable as-is.
$(VENV)/.stamp-install: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,milvus]' --config-settings editable_mode=compat
	$(PY) -m pip install --quiet -e 'clients/python[video]' --config-settings editable_mode=compat
	touch $@

# Generated protobuf + gRPC stubs (build outputs, git-ignored).
gen: facesvc/.stamp-gen
facesvc/.stamp-gen: $(PROTOS) scripts/gen_protos.sh $(VENV)/.stamp-install
	scripts/gen_protos.sh $(PY)
	touch $@

# Model weights: copied from FACESVC_MODEL_MIRROR (default ../shared/models)
# or downloaded, sha256-checked against models/manifest.json.
models: $(VENV)/.stamp-install
	$(PY) models/fetch.py

# Auth is off under `make run`, so it listens on loopback only: nobody else can reach an open server.
run: setup
	$(PY) -m server --auth=false --host 127.0.0.1 $(ARGS)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

lint-proto: $(BUF)
	cd protos && ../$(BUF) lint
	$(BUF) breaking protos --against $(CONTRACT_BASELINE)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint-proto lint
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) scripts/bench_pipeline.py $(ARGS)

bench-search: setup
	$(PY) -m pip install --quiet -e '.[bench,dev,milvus]' --config-settings editable_mode=compat
	$(PY) scripts/bench_search.py $(ARGS)

eval: setup
	$(PY) scripts/eval_verification.py $(ARGS)

install-gpu: setup
	$(PY) -m pip uninstall --quiet -y onnxruntime
	$(PY) -m pip install --quiet -e '.[gpu,dev,milvus]' --config-settings editable_mode=compat

clean:
	rm -rf $(VENV) .tools facesvc models/weights .pytest_cache
