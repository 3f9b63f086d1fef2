#!/usr/bin/env python3
"""Verify over JSON/HTTP, Connect binary and gRPC-Web against gRPC: one server, the same run.

A server subprocess (embedded storage, auth on, HTTP port on) gets one subject
enrolled; then --n rounds each send the same Verify (a 600x800 JPEG probe of the
subject) once per transport, in turn, so every transport sees the same server
state and load, one call at a time:

- grpc: the grpcio stub (HTTP/2, binary protobuf);
- json: a plain HTTP/1.1 POST of JSON with the photo in base64, as curl sends it
  (a kept-alive connection), answered with JSON;
- connect: the connectrpc client (HTTP/1.1, binary protobuf);
- grpc-web: the connectrpc client speaking gRPC-Web.

GetCollection (no model runs) is measured the same way, to show the transport's own
cost. Prints a table of p50/p95 latency and each transport's p50 against gRPC's,
and writes JSON (default .bench/bench_http.json).

    .venv/bin/python scripts/bench_http.py [--n 40]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from connectrpc.protocol import ProtocolType

from bench.common import percentiles, write_json
from bench.launcher import ADMIN_KEY, ServerProcess
from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from facesvc.v1.face_service_connect import FaceServiceClientSync

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "faces" / "dev"
KEY = {"x-api-key": ADMIN_KEY}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="rounds (each: one call per transport)")
    ap.add_argument("--enrol", default=str(FACES / "img21.jpg"))
    ap.add_argument("--probe", default=str(FACES / "img20.jpg"))
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_http.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    srv = ServerProcess("--http-port", "0", log_path=work / "server.log")
    try:
        stub = pb_grpc.FaceServiceStub(srv.channel)
        cid = "bench-http"
        stub.CreateCollection(pb.CreateCollectionRequest(collection=cid), timeout=30)
        stub.Register(
            pb.RegisterRequest(collection=cid, subject_id="s", image=pb.Image(encoded=Path(args.enrol).read_bytes())), timeout=60
        )
        probe = Path(args.probe).read_bytes()
        verify = pb.VerifyRequest(collection=cid, subject_id="s", image=pb.Image(encoded=probe))
        get = pb.GetCollectionRequest(collection=cid)
        verify_json = json.dumps({"collection": cid, "subjectId": "s", "image": {"encoded": base64.b64encode(probe).decode()}})
        get_json = json.dumps({"collection": cid})
        url = urlsplit(srv.http_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)

        def post_json(rpc: str, body: str) -> dict:
            conn.request("POST", f"/facesvc.v1.FaceService/{rpc}", body, {"content-type": "application/json", **KEY})
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            if resp.status != 200:
                raise SystemExit(f"{rpc} over JSON failed: {doc}")
            return doc

        connect = FaceServiceClientSync(srv.http_url)
        grpc_web = FaceServiceClientSync(srv.http_url, protocol=ProtocolType.GRPC_WEB)
        calls = {
            "Verify": {
                "grpc": lambda: stub.Verify(verify, timeout=60).match,
                "json": lambda: post_json("Verify", verify_json)["match"],
                "connect": lambda: connect.verify(verify, headers=KEY).match,
                "grpc-web": lambda: grpc_web.verify(verify, headers=KEY).match,
            },
            "GetCollection": {
                "grpc": lambda: stub.GetCollection(get, timeout=30).collection.subject_count,
                "json": lambda: int(post_json("GetCollection", get_json)["collection"]["subjectCount"]),
                "connect": lambda: connect.get_collection(get, headers=KEY).collection.subject_count,
                "grpc-web": lambda: grpc_web.get_collection(get, headers=KEY).collection.subject_count,
            },
        }
        rows = []
        for rpc, by_transport in calls.items():
            answers = {t: call() for t, call in by_transport.items()}  # warm-up, and every transport agrees
            if len(set(answers.values())) != 1:
                raise SystemExit(f"{rpc}: the transports disagree: {answers}")
            times: dict[str, list[float]] = {t: [] for t in by_transport}
            for _ in range(args.n):
                for transport, call in by_transport.items():
                    t0 = time.perf_counter()
                    call()
                    times[transport].append(time.perf_counter() - t0)
            base = percentiles(times["grpc"])["p50_ms"]
            for transport, seconds in times.items():
                stats = percentiles(seconds, (50, 95))
                rows.append({"rpc": rpc, "transport": transport, **stats, "p50_vs_grpc": stats["p50_ms"] / base})
        conn.close()
    finally:
        srv.stop()

    head = f"{'rpc':<14}{'transport':<10}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'p50/grpc':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['rpc']:<14}{r['transport']:<10}{r['n']:>5}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['p50_vs_grpc']:>10.2f}")
    out = write_json(args.out, {"n": args.n, "probe": args.probe, "probe_bytes": len(probe), "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
