"""Server reflection that carries the .proto comments, so `grpcurl describe` shows the docs.

protoc's Python output drops `source_code_info` (the comments) from the
embedded descriptors. `make gen` also writes a descriptor set built with
`--include_source_info`; this servicer answers reflection requests for our own
files from it and for everything else exactly as grpc's reference servicer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

import facesvc

log = logging.getLogger(__name__)

DESCRIPTOR_SET = Path(facesvc.__file__).resolve().parent / "descriptor_set.binpb"


def load_documented_files(path: Path = DESCRIPTOR_SET) -> dict[str, bytes]:
    if not path.is_file():
        log.warning("%s is missing (run `make gen`): reflection will serve descriptors without comments", path)
        return {}
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    return {f.name: f.SerializeToString() for f in fds.file}


class DocumentedReflectionServicer(reflection.ReflectionServicer):
    def __init__(self, service_names, documented: dict[str, bytes]):
        super().__init__(service_names)
        self._documented = documented

    def _with_docs(self, response):
        if response.HasField("file_descriptor_response"):
            files = response.file_descriptor_response.file_descriptor_proto
            replaced = [self._documented.get(descriptor_pb2.FileDescriptorProto.FromString(raw).name, raw) for raw in files]
            del files[:]
            files.extend(replaced)
        return response

    def _file_by_filename(self, request, filename):
        return self._with_docs(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request, fully_qualified_name):
        return self._with_docs(super()._file_containing_symbol(request, fully_qualified_name))

    def _file_containing_extension(self, request, containing_type, extension_number):
        return self._with_docs(super()._file_containing_extension(request, containing_type, extension_number))


def enable(server, service_names) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        DocumentedReflectionServicer(tuple(service_names) + (reflection.SERVICE_NAME,), load_documented_files()), server
    )
