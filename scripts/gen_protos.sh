#!/usr/bin/env sh
# Generate the Python protobuf/gRPC stubs and the commented descriptor set from protos/.
# Used by `make gen` and the Dockerfile. Usage: scripts/gen_protos.sh PYTHON (with grpcio-tools installed).
set -eu
PY=${1:-python3}
cd "$(dirname "$0")/.."
rm -rf facesvc && mkdir -p facesvc
# --include_source_info keeps the comments for reflection (grpcurl describe); see server/reflection.py.
# protoc-gen-connectrpc (beside PY) writes face_service_connect.py: the Connect/gRPC-Web/JSON app of server/web.
"$PY" -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
  --plugin=protoc-gen-connectrpc="$(dirname "$PY")/protoc-gen-connectrpc" \
  --connectrpc_out=. --connectrpc_opt=protobuf=google \
  --include_source_info --descriptor_set_out=facesvc/descriptor_set.binpb protos/facesvc/v1/*.proto
touch facesvc/__init__.py facesvc/v1/__init__.py
