# facesvc server image.
#   CPU (default):  docker build --build-context models=../shared/models -t facesvc .
#   CUDA:           docker build --build-context models=../shared/models \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 --build-arg GPU=1 -t facesvc:gpu .
#   Milvus engine:  docker build --build-context models=../shared/models --build-arg EXTRAS=milvus -t facesvc:milvus .
# Weights come from the `models` build context (a directory of ONNX files) and
# are sha256-checked against models/manifest.json; without that context the
# fetch step downloads each model's upstream URL (mirror-only files then fail
# the build, loudly). Weights are never part of the repository.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM scratch AS models
FROM ${BASE_IMAGE}
ARG GPU=0
# optional extras of pyproject.toml, e.g. EXTRAS=milvus for FACESVC_INDEX_ENGINE=milvus
ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY models/manifest.json models/fetch.py ./models/
COPY scripts/gen_protos.sh ./scripts/
RUN python3 -m venv /venv && /venv/bin/pip install --upgrade pip \
 && /venv/bin/pip install grpcio-tools \
 && scripts/gen_protos.sh /venv/bin/python \
 && /venv/bin/pip install ".${EXTRAS:+[$EXTRAS]}" \
 && if [ "$GPU" = "1" ]; then /venv/bin/pip uninstall -y onnxruntime && /venv/bin/pip install "onnxruntime-gpu>=1.18"; fi \
 && /venv/bin/pip uninstall -y grpcio-tools
RUN --mount=type=bind,from=models,target=/mirror \
    FACESVC_MODEL_MIRROR=/mirror /venv/bin/python models/fetch.py --target /app/models/weights \
 && rm -rf /root/.cache
# The embedded SQLite database (when FACESVC_DB_URL is empty) lives on a volume.
RUN mkdir -p /data && chown 65534:65534 /data
# Search graphs on transparent huge pages (server/hugepages.py): set here, the server need not
# restart itself to get them. FACESVC_HUGE_PAGES=false turns it off (the server restarts without it).
ENV FACESVC_MODEL_DIR=/app/models/weights FACESVC_MODEL_MANIFEST=/app/models/manifest.json \
    FACESVC_HOST=0.0.0.0 FACESVC_PORT=50051 FACESVC_DATA_DIR=/data GLIBC_TUNABLES=glibc.malloc.hugetlb=1
VOLUME /data
EXPOSE 50051
USER 65534:65534
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD /venv/bin/python -c "import grpc,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;sys.exit(0 if g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(),timeout=2).status==1 else 1)"
ENTRYPOINT ["/venv/bin/facesvc-server"]
