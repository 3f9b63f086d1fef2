# syntax=docker/dockerfile:1.7
# facesvc server image.
#
# Needs BuildKit (named build contexts, RUN --mount, the syntax line above): the default builder
# from Docker 23 on (`docker build` = `docker buildx build`); with older Docker, DOCKER_BUILDKIT=1.
#
#   CPU (default):
#     docker build --build-context models=../shared/models -t facesvc .
#   CUDA (the GPU variant: onnxruntime-gpu instead of onnxruntime, with the CUDA 13 runtime and
#   cuDNN 9 as wheels, so the same base; the host needs the NVIDIA driver 580+ and the container
#   toolkit; run it with `--gpus all -e FACESVC_DEVICE=cuda`):
#     docker build --build-context models=../shared/models --build-arg GPU=1 -t facesvc:gpu .
#   Milvus engine (FACESVC_INDEX_ENGINE=milvus; the pyproject extra `milvus`):
#     docker build --build-context models=../shared/models --build-arg EXTRAS=milvus -t facesvc:milvus .
#
# Layers, slowest-changing first: the dependencies (from the pyproject files alone), the model
# weights (from models/manifest.json, fetch.py and derive.py alone), then the code, once, as
# wheels installed into the virtual environment: editing the code reinstalls no dependency and
# fetches no weight. Weights come from the `models` build context (a directory of ONNX files,
# sha256-checked against the manifest); without it, fetch.py derives or downloads each one and
# fails the build naming the origin of any it cannot get (docs/models.md). Never put a key in the
# environment: every secret setting has a *_FILE twin (FACESVC_ADMIN_API_KEY_FILE=/run/secrets/…).
#
# Pin the base by digest for reproducible builds:
#   --build-arg BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest from `docker buildx imagetools inspect`>
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
ARG PIP_VERSION=26.3

# The default `models` context is empty: fetch.py then downloads (or derives) every file.
FROM scratch AS models

FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# CUDA base images have no Python; the python images skip this.
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# -- dependencies: only the pyproject files come in, so this layer survives code edits ----------
FROM base AS deps
ARG PIP_VERSION
ARG GPU=0
# optional extras of pyproject.toml, e.g. EXTRAS=milvus for FACESVC_INDEX_ENGINE=milvus
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml ./
COPY clients/python/pyproject.toml clients/python/
COPY scripts/pyproject_deps.py scripts/
RUN python3 -m venv /venv && /venv/bin/pip install "pip==${PIP_VERSION}" \
 && if [ "$GPU" = "1" ]; then server="pyproject.toml:gpu${EXTRAS:+,$EXTRAS} --without onnxruntime"; else server="pyproject.toml${EXTRAS:+:$EXTRAS}"; fi \
 && /venv/bin/python scripts/pyproject_deps.py $server clients/python/pyproject.toml:video > /tmp/requirements.txt \
 && /venv/bin/pip install -r /tmp/requirements.txt

# -- weights: their own venv with onnx (for the derivation), kept out of the final image ---------
FROM base AS weights
ARG PIP_VERSION
RUN python3 -m venv /fetch && /fetch/bin/pip install "pip==${PIP_VERSION}" "onnx==1.23.2"
COPY models/manifest.json models/fetch.py models/derive.py /src/models/
RUN --mount=type=bind,from=models,target=/mirror \
    /fetch/bin/python /src/models/fetch.py --mirror /mirror --target /weights

# -- the code, as wheels: the generated stubs, the server, the CLI ------------------------------
FROM deps AS build
RUN /venv/bin/pip install "grpcio-tools>=1.66,<2" "protoc-gen-connectrpc>=0.13,<0.14"
COPY README.md LICENSE NOTICE ./
COPY protos ./protos
COPY scripts/gen_protos.sh ./scripts/
COPY server ./server
COPY clients/python ./clients/python
RUN scripts/gen_protos.sh /venv/bin/python \
 && /venv/bin/pip wheel --no-deps --wheel-dir /wheels . ./clients/python

FROM base
COPY --from=deps /venv /venv
# Installed from a bind mount: the wheels themselves never become a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels /venv/bin/pip install --no-deps /wheels/*.whl
COPY --from=weights /weights /app/models/weights
COPY models/manifest.json /app/models/manifest.json
# The embedded SQLite database (when FACESVC_DB_URL is empty) lives on a volume.
RUN mkdir -p /data && chown 65534:65534 /data
# Search graphs on transparent huge pages (server/hugepages.py): set here, the server need not
# restart itself to get them. FACESVC_HUGE_PAGES=false turns it off (the server restarts without it).
# The operator tools are on PATH: facesvc-server, facesvc (the CLI), facesvc-reembed.
ENV PATH=/venv/bin:$PATH \
    FACESVC_MODEL_DIR=/app/models/weights FACESVC_MODEL_MANIFEST=/app/models/manifest.json \
    FACESVC_HOST=0.0.0.0 FACESVC_PORT=50051 FACESVC_DATA_DIR=/data GLIBC_TUNABLES=glibc.malloc.hugetlb=1
WORKDIR /app
VOLUME /data
EXPOSE 50051
USER 65534:65534
# Follows FACESVC_PORT / FACESVC_HOST as the server reads them (server/healthcheck.py).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s CMD ["/venv/bin/python", "-m", "server.healthcheck"]
ENTRYPOINT ["/venv/bin/facesvc-server"]
