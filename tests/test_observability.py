"""Prometheus metrics on their own port, request ids on answers and log lines, JSON logs."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import grpc
import pytest

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, image


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess.with_metrics(log_path=tmp_path_factory.mktemp("obs") / "server.log", env={"FACESVC_LOG_FORMAT": "json"})
    yield s
    s.stop()


def test_metrics_count_calls_errors_inference_and_index(srv):
    stub = pb_grpc.FaceServiceStub(srv.channel)
    for _ in range(3):
        stub.Detect(pb.DetectRequest(image=image("dev/img1.jpg")), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Compare(pb.CompareRequest(source=image("dev/noface_rocket.jpg"), target=image("dev/img1.jpg")), timeout=30)
    with pytest.raises(grpc.RpcError):
        srv.stub(None).Detect(pb.DetectRequest(image=image("dev/img1.jpg")), timeout=30)
    stub.CreateCollection(pb.CreateCollectionRequest(collection="obs", liveness_policy=pb.LIVENESS_POLICY_OPTIONAL), timeout=10)
    stub.Register(
        pb.RegisterRequest(collection="obs", subject_id="p1", image=image("dev/img1.jpg"), skip_liveness=True), timeout=30
    )
    stats = stub.GetIndexStats(pb.GetIndexStatsRequest(collection="obs"), timeout=10)
    # which runtime runs each model, in the answer and in the metrics
    runs = {m.model: (m.kind, m.runtime, m.precision, m.device) for m in stats.models}
    assert runs["scrfd_500m"][:2] == ("detector", "openvino") and runs["w600k_mbf"][0] == "recognizer"
    m = scrape(srv.metrics_port)
    for name, (kind, runtime, precision, device) in runs.items():
        labels = f'device="{device}",kind="{kind}",model="{name}",precision="{precision}",runtime="{runtime}"'
        assert m[f"facesvc_model_info{{{labels}}}"] == 1
    assert m['facesvc_rpc_total{code="OK",method="Detect"}'] == 3
    assert m['facesvc_rpc_total{code="INVALID_ARGUMENT",method="Compare"}'] == 1
    assert m['facesvc_rpc_errors_total{method="Compare",reason="NO_FACE_DETECTED"}'] == 1
    assert m['facesvc_rpc_errors_total{method="Detect",reason="API_KEY_MISSING"}'] == 1
    assert m['facesvc_rpc_total{code="UNAUTHENTICATED",method="Detect"}'] == 1
    assert m['facesvc_rpc_duration_seconds_count{method="Detect"}'] == 4
    # 3 Detect, Register, and Compare's first photo, which has no face: its first pass, the close-up
    # pass, and the three turns with two passes each (server/vision/finder.py); and as many for the
    # empty frame the server warms up on before it serves (FacePipeline.warm_up)
    assert m['facesvc_model_inference_seconds_count{model="scrfd_500m"}'] == 3 + 1 + 8 + 8
    assert m['facesvc_model_inference_seconds_count{model="w600k_mbf"}'] >= 1
    assert m['facesvc_index_faces{collection="obs"}'] == 1
    assert m["facesvc_streams_active"] == 0
    assert m["process_resident_memory_bytes"] > 50e6 and m["process_open_fds"] > 0


def test_request_id_is_echoed_and_on_the_log_lines(srv):
    stub = pb_grpc.FaceServiceStub(srv.channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Compare(
            pb.CompareRequest(source=image("dev/noface_rocket.jpg"), target=image("dev/img1.jpg")),
            metadata=(("x-request-id", "trace-4711"),),
            timeout=30,
        )
    assert ("x-request-id", "trace-4711") in e.value.initial_metadata()
    _, call = stub.Detect.with_call(pb.DetectRequest(image=image("dev/img1.jpg")), timeout=30)
    generated = dict(call.initial_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", generated)
    lines = [json.loads(ln) for ln in srv.output().splitlines() if ln.startswith("{")]
    assert lines and all({"ts", "level", "logger", "request_id", "msg"} <= set(ln) for ln in lines)
    failed = [ln for ln in lines if ln["request_id"] == "trace-4711"]
    assert failed and "NO_FACE_DETECTED" in failed[0]["msg"]


def inferences(port: int) -> float:
    return sum(v for k, v in scrape(port).items() if k.startswith("facesvc_model_inference_seconds_count"))


def test_a_call_past_its_deadline_stops_its_work_and_writes_nothing(srv):
    stub = pb_grpc.FaceServiceStub(srv.channel)
    big = [image(f"dev/{p}") for p in ("img1.jpg", "img2.jpg")]  # multi-megapixel portraits: ~100 ms of work each
    req = pb.CompareRequest(source=big[0], target=big[1], require_liveness=True)
    before = inferences(srv.metrics_port)
    stub.Compare(req, timeout=30)
    full = inferences(srv.metrics_port) - before
    assert full == 9  # per photo: detect + the liveness ensemble (the pair + SE-128); then one embed call for both faces
    before = inferences(srv.metrics_port)
    with pytest.raises(grpc.RpcError) as e:
        stub.Compare(req, timeout=0.04)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.5)  # whatever the server still did for the dead call is done by now
    done = inferences(srv.metrics_port) - before
    assert done < full, f"{done} of {full} inferences ran for a call that was already dead"
    assert "CALL_ENDED" in srv.output()
    # a Register whose deadline passes while it works commits nothing
    with pytest.raises(grpc.RpcError) as e:
        stub.Register(pb.RegisterRequest(collection="obs", subject_id="late", image=big[0], skip_liveness=True), timeout=0.04)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.5)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSubject(pb.GetSubjectRequest(collection="obs", subject_id="late"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
