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

.PHONY: help setup run test lint lint-proto gen models int8 web browser install-gpu bench bench-search eval bench-http clean

help:
	@echo "make run        set everything up and start the server on embedded defaults"
	@echo "make test       set everything up, lint (buf lint + buf breaking, ruff) and run the whole test suite"
	@echo "make setup      venv, dependencies, generated stubs, model weights, the web console"
	@echo "make int8       quantize the detector and recognizer for FACESVC_PRECISION=int8 (models/quantize.py)"
	@echo "make web        build the web console (npm ci, buf generate, vite build into web/dist)"
	@echo "make browser    install Debian's chromium for the browser test when it is missing (root)"
	@echo "make bench      scripts/bench_pipeline.py (per-stage and end-to-end latency)"
	@echo "make bench-http scripts/bench_http.py (Verify over JSON/HTTP vs gRPC, same server, same run)"
	@echo "make bench-search  scripts/bench_search.py (hnswlib vs FAISS flat / HNSW; ARGS=--size 1000000 for 1 M)"
	@echo "make eval       scripts/eval_verification.py (threshold calibration on labelled pairs)"
	@echo "make install-gpu  swap CPU onnxruntime for onnxruntime-gpu in the venv"

setup: $(VENV)/.stamp-install facesvc/.stamp-gen models web

# What the server needs to run (`make run`): its dependencies, the stub generator, onnx for the
# weights' derivation, and the `facesvc` CLI (no dependency beyond the server's). A .pth file puts
# the checkout's root on sys.path: the generated `facesvc` stubs (written after this install),
# bench/ and scripts/ import from it, under `python scripts/x.py` as under pytest.
$(VENV)/.stamp-runtime: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[codegen,models]'
	$(PY) -m pip install --quiet -e 'clients/python[video]'
	$(PY) -c 'import sysconfig; open(sysconfig.get_paths()["purelib"] + "/facesvc-checkout.pth", "w").write("$(CURDIR)\n")'
	touch $@

# Everything `make test` needs besides: pytest, ruff, hypothesis, grpcurl.
$(VENV)/.stamp-install: $(VENV)/.stamp-runtime
	$(PY) -m pip install --quiet -e '.[dev,milvus]'
	touch $@

# Generated protobuf + gRPC stubs (build outputs, git-ignored).
gen: facesvc/.stamp-gen
facesvc/.stamp-gen: $(PROTOS) scripts/gen_protos.sh $(VENV)/.stamp-runtime
	scripts/gen_protos.sh $(PY)
	touch $@

# Model weights: copied from FACESVC_MODEL_MIRROR (default ../shared/models),
# derived (models/derive.py) or downloaded, sha256-checked against models/manifest.json.
models: $(VENV)/.stamp-runtime
	$(PY) models/fetch.py

# FACESVC_PRECISION=int8: the detector and recognizer quantized by NNCF, calibrated on the photos of
# ../shared/faces and checked against the float models (models/quantize.py); redone only when stale.
int8: $(VENV)/.stamp-int8 models
	$(PY) -m models.quantize
$(VENV)/.stamp-int8: $(VENV)/.stamp-install
	$(PY) -m pip install --quiet -e '.[int8]'
	touch $@

# The web console the HTTP port serves at /: npm ci from the committed lock file, protobuf-es code
# generated from protos/ by buf, bundled by vite into web/dist (nothing is fetched at run time).
WEB_SRC := $(wildcard web/src/*.ts web/src/*.css) web/index.html web/vite.config.ts web/buf.gen.yaml web/package.json web/package-lock.json
web: web/dist/index.html
web/dist/index.html: $(WEB_SRC) $(PROTOS) $(BUF)
	cd web && npm ci --silent --no-audit --no-fund
	rm -rf web/src/gen && cd web && ../$(BUF) generate
	cd web && npx --no-install vite build --logLevel warn

# Headless Chromium for tests/test_console.py: Debian's package, installed (as root) when missing.
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

# Auth is off under `make run`, so it listens on loopback only: nobody else can reach an open server.
# The HTTP port (Connect, gRPC-Web, JSON and the web console) is http://127.0.0.1:8080.
run: $(VENV)/.stamp-runtime facesvc/.stamp-gen models web
	$(PY) -m server --auth=false --host 127.0.0.1 --http-port 8080 $(ARGS)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

lint-proto: $(BUF)
	cd protos && ../$(BUF) lint
	$(BUF) breaking protos --against $(CONTRACT_BASELINE)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup int8 browser lint-proto lint
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) scripts/bench_pipeline.py $(ARGS)

bench-search: setup
	$(PY) -m pip install --quiet -e '.[bench,dev,milvus]'
	$(PY) scripts/bench_search.py $(ARGS)

bench-http: setup
	$(PY) scripts/bench_http.py $(ARGS)

eval: setup
	$(PY) scripts/eval_verification.py $(ARGS)

install-gpu: setup
	$(PY) -m pip install --quiet -e '.[gpu,dev,milvus]'
	@# both wheels ship the onnxruntime module: drop both, then lay the GPU build's files down alone
	$(PY) -m pip uninstall --quiet -y onnxruntime onnxruntime-gpu
	$(PY) -m pip install --quiet --no-deps "$$($(PY) scripts/pyproject_deps.py pyproject.toml:gpu | grep '^onnxruntime-gpu')"

clean:
	rm -rf $(VENV) .tools facesvc models/weights .pytest_cache web/node_modules web/src/gen web/dist
