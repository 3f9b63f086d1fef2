"""Backends going away and coming back during traffic, on private instances started by the test
(the shared Redis/MariaDB on the default ports stay up for the rest of the suite)."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from bench.launcher import free_port
from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server import errors
from tests.conftest import ServerProcess, backend_unreachable, error_info, image


def assert_no_backend_detail(err: grpc.RpcError, port: int) -> None:
    """An outage is reported by its reason; the driver's text (host, port, user, errno) stays in the server log."""
    text = err.details() + str(error_info(err))
    for leak in (str(port), "127.0.0.1", "Errno", "pymysql", "Connection", "Error "):
        assert leak not in text, f"{leak!r} reached the client: {text}"


class PrivateRedis:
    def __init__(self, port: int, workdir):
        self.port, self.workdir, self.proc = port, workdir, None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            backend_unreachable("redis-server binary", FileNotFoundError("redis-server"))
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "private redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def test_redis_down_and_back_during_traffic(tmp_path):
    redis = PrivateRedis(free_port(), tmp_path)
    redis.start()
    srv = ServerProcess(
        log_path=tmp_path / "server.log",
        env={"FACESVC_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0", "FACESVC_REDIS_PREFIX": "fault:"},
    )
    try:
        stub = pb_grpc.FaceServiceStub(srv.channel)
        coll = "faults-" + uuid.uuid4().hex[:6]
        stub.CreateCollection(
            pb.CreateCollectionRequest(collection=coll, liveness_policy=pb.LIVENESS_POLICY_OPTIONAL), timeout=10
        )
        stub.Register(pb.RegisterRequest(collection=coll, subject_id="alice", image=image("dev/img1.jpg")), timeout=30)
        process = pb.ProcessRequest(collection=coll, subject_id="bob", image=image("dev/img13.jpg"))
        assert stub.Process(process, timeout=30).staging_token

        redis.stop()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.Process(process, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and error_info(e.value).reason == "CACHE_UNAVAILABLE"
        assert time.monotonic() - t0 < 10  # a clear answer, not a hang
        assert_no_backend_detail(e.value, redis.port)
        # what does not need the staging cache keeps working
        assert stub.Verify(pb.VerifyRequest(collection=coll, subject_id="alice", image=image("dev/img2.jpg")), timeout=30).match
        hit = stub.Search(pb.SearchRequest(collection=coll, image=image("dev/img6.jpg")), timeout=30).results[0].matches[0]
        assert hit.subject_id == "alice"
        stub.Register(pb.RegisterRequest(collection=coll, subject_id="carol", image=image("dev/img20.jpg")), timeout=30)

        redis.start()  # same port, empty: the server reconnects by itself
        deadline = time.monotonic() + 20
        while True:
            try:
                token = stub.Process(process, timeout=30).staging_token
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.5)
        reg = stub.Register(pb.RegisterRequest(collection=coll, subject_id="bob", staging_token=token), timeout=30)
        assert reg.subject_created
        assert srv.health() == 1  # SERVING throughout, no restart
    finally:
        srv.stop()
        redis.stop()


class PrivateMariaDB:
    """A throw-away mariadbd with its own data directory and port."""

    def __init__(self, port: int, workdir):
        self.port, self.dir, self.proc = port, workdir / "mariadb", None
        exe = shutil.which("mariadb-install-db")
        if exe is None or shutil.which("mariadbd", path="/usr/sbin:/usr/bin") is None:
            backend_unreachable("mariadbd / mariadb-install-db", FileNotFoundError("mariadbd"))
        subprocess.run(
            [
                exe,
                "--no-defaults",
                f"--datadir={self.dir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        exe = shutil.which("mariadbd", path="/usr/sbin:/usr/bin")
        self.log = open(self.dir.parent / "mariadbd.log", "a")
        self.proc = subprocess.Popen(
            [
                exe,
                "--no-defaults",
                f"--datadir={self.dir}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--socket={self.dir.parent / 'mysqld.sock'}",
                "--user=root",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
            ],
            stdout=self.log,
            stderr=self.log,
        )
        import pymysql

        deadline = time.monotonic() + 60
        while True:
            try:
                conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", connect_timeout=1)
                conn.cursor().execute("CREATE DATABASE IF NOT EXISTS facesvc CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
                conn.close()
                return
            except pymysql.err.MySQLError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "private mariadbd did not start"
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
            self.proc = None
            self.log.close()


def register_when_back(stub, collection: str, seconds: float = 30) -> None:
    """Register "bob" once the database is back: UNAVAILABLE until then, nothing else."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            stub.Register(pb.RegisterRequest(collection=collection, subject_id="bob", image=image("dev/img13.jpg")), timeout=30)
            return
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
            time.sleep(0.5)


def test_mysql_down_and_back_during_traffic(tmp_path):
    db = PrivateMariaDB(free_port(), tmp_path)
    db.start()
    srv = ServerProcess(log_path=tmp_path / "server.log", env={"FACESVC_DB_URL": f"mysql://root@127.0.0.1:{db.port}/facesvc"})
    try:
        stub = pb_grpc.FaceServiceStub(srv.channel)
        stub.CreateCollection(
            pb.CreateCollectionRequest(collection="faults", liveness_policy=pb.LIVENESS_POLICY_OPTIONAL), timeout=10
        )
        stub.Register(pb.RegisterRequest(collection="faults", subject_id="alice", image=image("dev/img1.jpg")), timeout=30)
        verify = pb.VerifyRequest(collection="faults", subject_id="alice", image=image("dev/img2.jpg"))
        assert stub.Verify(verify, timeout=30).match

        db.stop()
        for call, req in (
            (stub.Register, pb.RegisterRequest(collection="faults", subject_id="bob", image=image("dev/img13.jpg"))),
            (stub.Verify, verify),
            (stub.ListSubjects, pb.ListSubjectsRequest(collection="faults")),
        ):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and error_info(e.value).reason == "STORE_UNAVAILABLE", e.value
            assert time.monotonic() - t0 < 15  # a clear answer, not a hang
            assert_no_backend_detail(e.value, db.port)
        assert len(stub.Detect(pb.DetectRequest(image=image("dev/img2.jpg")), timeout=30).faces) == 1  # stateless: fine
        # an unauthenticated caller during the outage learns no more than the reason either
        stranger = srv.stub("fsk_" + "0" * 16 + "_" + "A" * 43)
        with pytest.raises(grpc.RpcError) as e:
            stranger.Detect(pb.DetectRequest(image=image("dev/img2.jpg")), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and error_info(e.value).reason == "STORE_UNAVAILABLE"
        assert_no_backend_detail(e.value, db.port)

        db.start()  # same data, same port: the pool reconnects by itself
        register_when_back(stub, "faults")
        assert stub.Verify(verify, timeout=30).match
        names = [s.subject_id for s in stub.ListSubjects(pb.ListSubjectsRequest(collection="faults"), timeout=10).subjects]
        assert names == ["alice", "bob"]  # nothing lost, nothing doubled by the failed attempt
        hit = stub.Search(pb.SearchRequest(collection="faults", image=image("dev/img14.jpg")), timeout=30).results[0].matches
        assert hit and hit[0].subject_id == "bob"
        assert srv.health() == 1
    finally:
        srv.stop()
        db.stop()


def test_a_mysql_that_stops_answering_holds_no_worker_and_comes_back(tmp_path):
    """A database that hangs (SIGSTOP: connections are accepted, nothing is answered; or a network
    that drops packets) held each call that touched it for the 30 s read timeout: callers got
    DEADLINE_EXCEEDED without a reason, and eight such calls took every worker thread, so that calls
    needing no database waited too. A statement now waits no longer than its caller does, answered
    STORE_UNAVAILABLE, and once the database is known not to answer, calls are answered at once."""
    db = PrivateMariaDB(free_port(), tmp_path)
    db.start()
    srv = ServerProcess(log_path=tmp_path / "server.log", env={"FACESVC_DB_URL": f"mysql://root@127.0.0.1:{db.port}/facesvc"})
    stopped = False
    try:
        stub = pb_grpc.FaceServiceStub(srv.channel)
        stub.CreateCollection(
            pb.CreateCollectionRequest(collection="hung", liveness_policy=pb.LIVENESS_POLICY_OPTIONAL), timeout=10
        )
        stub.Register(pb.RegisterRequest(collection="hung", subject_id="alice", image=image("dev/img1.jpg")), timeout=30)
        listing = pb.ListSubjectsRequest(collection="hung")

        def unavailable_within(seconds: float, timeout: float) -> None:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.ListSubjects(listing, timeout=timeout)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and error_info(e.value).reason == "STORE_UNAVAILABLE", e.value
            assert time.monotonic() - t0 < seconds
            assert_no_backend_detail(e.value, db.port)

        os.kill(db.proc.pid, signal.SIGSTOP)
        stopped = True
        unavailable_within(4.0, timeout=4)  # the statement gave up before the caller did
        deadline = time.monotonic() + 10  # a probe finds the database silent: from then on, at once
        while True:
            try:
                unavailable_within(0.5, timeout=3)
                break
            except AssertionError:
                assert time.monotonic() < deadline
        with ThreadPoolExecutor(8) as ex:  # eight callers without a deadline: one at most tries the database
            calls = [ex.submit(unavailable_within, 6.0, None) for _ in range(8)]
            assert len(stub.Detect(pb.DetectRequest(image=image("dev/img2.jpg")), timeout=10).faces) == 1
            for c in calls:
                c.result()
        assert srv.health() == 1

        os.kill(db.proc.pid, signal.SIGCONT)
        stopped = False
        register_when_back(stub, "hung")
        assert [s.subject_id for s in stub.ListSubjects(listing, timeout=10).subjects] == ["alice", "bob"]
    finally:
        if stopped:
            os.kill(db.proc.pid, signal.SIGCONT)
        srv.stop()
        db.stop()


def test_a_redis_that_refuses_writes_is_unavailable_not_a_bug(tmp_path):
    """A Redis that answers with an error of its own (READONLY: a replica after a failover; OOM: full
    under noeviction) raised a ResponseError that became INTERNAL, with a traceback, for every
    Process and Register: it is CACHE_UNAVAILABLE, as a Redis that is away."""
    import redis

    from server.storage.staging import RedisStagingCache
    from server.storage.staging.base import new_token
    from tests.test_staging import staged

    private = PrivateRedis(free_port(), tmp_path)
    private.start()
    try:
        url = f"redis://127.0.0.1:{private.port}/0"
        cache, admin = RedisStagingCache(url, prefix="refuses:"), redis.Redis.from_url(url)
        cache.put(new_token(), staged(), ttl_s=60)
        writes = (lambda: cache.put(new_token(), staged(), ttl_s=60), lambda: cache.delete(new_token(), "c"))
        admin.replicaof("127.0.0.1", free_port())  # what a client still pointed at the old master meets
        for write in writes:
            with pytest.raises(errors.FaceServiceError) as e:
                write()
            assert e.value.reason == errors.CACHE_UNAVAILABLE and e.value.code == grpc.StatusCode.UNAVAILABLE
        admin.replicaof("no", "one")
        admin.config_set("min-replicas-to-write", 1)  # NOREPLICAS: an error redis-py has no class for
        with pytest.raises(errors.FaceServiceError) as e:
            writes[0]()
        assert e.value.reason == errors.CACHE_UNAVAILABLE
        admin.config_set("min-replicas-to-write", 0)
        admin.set(cache._members("c"), "not a sorted set")  # WRONGTYPE: a bug to see, not an outage to retry
        with pytest.raises(redis.ResponseError):
            cache.put(new_token(), staged(), ttl_s=60)
        admin.close()
    finally:
        private.stop()


def test_an_http_call_with_a_key_waits_no_longer_than_its_deadline_behind_a_hung_database(mysql_url, tmp_path):
    """The HTTP port looks a key up before the call begins, outside any call: behind a frozen MySQL
    that lookup waited the 30 s read timeout whatever the request's connect-timeout-ms, and a few
    such calls took every HTTP worker, so that calls needing no database waited too. The lookup
    and the handler now count from the request's arrival."""
    import json
    import urllib.error
    import urllib.request

    from bench.launcher import ADMIN_KEY
    from tests.test_store import MySqlProxy

    proxy = MySqlProxy(mysql_url)
    srv = ServerProcess(
        "--http-port",
        "0",
        log_path=tmp_path / "server.log",
        env={"FACESVC_DB_URL": proxy.url, "FACESVC_AUTH_CACHE_SECONDS": "0.5"},
    )
    try:
        stub = pb_grpc.FaceServiceStub(srv.channel)
        cid = "hung-http-" + uuid.uuid4().hex[:6]
        stub.CreateCollection(pb.CreateCollectionRequest(collection=cid), timeout=10)
        key = stub.CreateApiKey(pb.CreateApiKeyRequest(collection=cid), timeout=10).secret

        def post(rpc: str, body: dict, key: str) -> tuple[int, dict, float]:
            req = urllib.request.Request(
                f"{srv.http_url}/facesvc.v1.FaceService/{rpc}",
                data=json.dumps(body).encode(),
                headers={"content-type": "application/json", "x-api-key": key, "connect-timeout-ms": "2000"},
            )
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read()), time.monotonic() - t0
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read()), time.monotonic() - t0

        assert post("ListSubjects", {"collection": cid}, key)[0] == 200
        proxy.frozen.set()
        time.sleep(1.0)  # the key's cache entry expires: the next call looks it up
        status, doc, took = post("ListSubjects", {"collection": cid}, key)
        assert status == 503 and doc["details"][0]["debug"]["reason"] == "STORE_UNAVAILABLE", doc
        assert took < 2.5
        with ThreadPoolExecutor(4) as ex:  # more such calls than HTTP workers: a Detect still goes through
            calls = [ex.submit(post, "ListSubjects", {"collection": cid}, key) for _ in range(8)]
            detect = post("Detect", {"image": {"encoded": base64.b64encode(image("dev/img2.jpg").encoded).decode()}}, ADMIN_KEY)
            assert all(c.result()[2] < 5 for c in calls)
        assert detect[0] == 200 and detect[2] < 5
    finally:
        proxy.frozen.clear()
        srv.stop()
        proxy.close()
