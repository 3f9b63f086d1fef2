"""`facesvc`: the command line over FaceClient.

    facesvc [--target HOST:PORT] [--api-key KEY] [--tls --ca CA.pem ...] COMMAND ...

The target and key also come from FACESVC_TARGET and FACESVC_API_KEY. Results
print as JSON in the proto3 JSON mapping, as grpcurl prints them (lowerCamelCase
names: `stagingToken`, `subjectId`; 64-bit integers as strings); `--proto-names`
keeps the .proto field names (`staging_token`). Errors print
`error: CODE REASON: message` on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path

from google.protobuf import json_format

from facesvc.v1 import face_service_pb2 as pb
from facesvc_client.client import FaceClient
from facesvc_client.errors import FaceServiceError, from_item_error

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


# Set by main() from --proto-names: the JSON mapping's lowerCamelCase names (grpcurl's) unless set.
PROTO_NAMES = False


def as_json(msg, indent: int | None = 2) -> str:
    if isinstance(msg, list):
        return json.dumps([json_format.MessageToDict(m, preserving_proto_field_name=PROTO_NAMES) for m in msg], indent=indent)
    return json_format.MessageToJson(msg, preserving_proto_field_name=PROTO_NAMES, indent=indent)


def field_name(name: str) -> str:
    """A snake_case name as the output spells it (for the few answers the CLI composes itself)."""
    if PROTO_NAMES:
        return name
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def show(msg) -> None:
    print(as_json(msg))


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def client_from(args) -> FaceClient:
    return FaceClient(
        args.target,
        api_key=args.api_key or None,
        tls=args.tls,
        root_certificates=_read(args.ca),
        client_certificate=_read(args.cert),
        client_key=_read(args.key),
        timeout=args.timeout,
    )


# -- bulk enrolment ---------------------------------------------------------------------
def photos_by_person(root: Path) -> list[tuple[str, Path]]:
    """(subject id, photo) for every image file in DIR/<subject id>/."""
    out = []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        out += [(person.name, f) for f in sorted(person.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    return out


class Progress:
    """One line on stderr: a bar, counts and the rate."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.failed, self.stream, self.t0 = total, 0, 0, stream, time.monotonic()

    def step(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        width = 30
        filled = int(width * self.done / max(1, self.total))
        rate = self.done / max(1e-6, time.monotonic() - self.t0)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} failed {self.failed}  {rate:.1f} photos/s"
        )
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\n")


def enroll(c: FaceClient, args) -> int:
    items = photos_by_person(Path(args.dir))
    if not items:
        print(f"error: no photos in {args.dir}/<subject id>/", file=sys.stderr)
        return 1
    progress = Progress(len(items))
    failures, subjects = [], Counter()

    def requests():
        for subject, photo in items:
            req = pb.RegisterRequest(
                collection=args.collection, subject_id=subject, add_face=True, skip_liveness=args.skip_liveness
            )
            try:
                req.image.encoded = photo.read_bytes()
            except OSError as exc:  # unreadable locally: the server would say INVALID_IMAGE anyway
                req.image.encoded = b""
                print(f"\nwarning: {photo}: {exc}", file=sys.stderr)
            yield str(photo.relative_to(args.dir)), req

    for r in c.register_batch(requests(), timeout=None):
        if r.HasField("error"):
            failures.append((r.item_id, from_item_error(r.error)))
        else:
            subjects[r.result.subject.subject_id] += 1
        progress.step(not r.HasField("error"))
    progress.finish()
    print(f"enrolled {sum(subjects.values())} of {len(items)} photos: {len(subjects)} subjects in {args.collection!r}")
    if failures:
        print(f"{len(failures)} failed:")
        for item, err in failures:
            print(f"  {item}: {err.reason or err.code.name}: {err.message}")
    return 1 if failures else 0


def calibrate(c: FaceClient, args) -> int:
    """CalibrateThreshold on a CSV of photo pairs; with --apply, set the result on the collection."""
    root = Path(args.pairs).parent
    with open(args.pairs, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"file_a", "file_b", "same"} <= set(rows[0]):
        print(f"error: {args.pairs}: expected the columns file_a,file_b,same", file=sys.stderr)
        return 1
    # Each photo is embedded once here (Embed), and the pairs go as embeddings: a CSV may name far
    # more pairs than one request could carry as photos.
    embedded: dict[Path, list[float] | None] = {}
    for r in rows:
        for name in (r["file_a"], r["file_b"]):
            path = root / name
            if path not in embedded:
                faces = c.embed(path).faces
                embedded[path] = list(faces[0].embedding) if faces else None
    pairs = [
        (embedded[root / r["file_a"]], embedded[root / r["file_b"]], r["same"].strip() in ("1", "true", "yes")) for r in rows
    ]
    usable = [p for p in pairs if p[0] is not None and p[1] is not None]
    r = c.calibrate_threshold(args.collection, usable, args.far, timeout=None)
    r.skipped_pairs += len(pairs) - len(usable)
    show(r)
    if args.apply:
        if r.below_floor:
            print("error: the threshold is below the server's floor; not applied", file=sys.stderr)
            return 1
        show(c.update_collection(args.collection, **{f"{args.apply}_threshold": r.threshold}))
    return 0


# -- live streams -----------------------------------------------------------------------
def stream(c: FaceClient, args) -> int:
    import cv2

    source = int(args.source) if args.source.isdigit() else args.source
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        print(f"error: cannot open {args.source!r}", file=sys.stderr)
        return 1
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    pace = isinstance(source, str) and not args.no_pace  # a file plays at its own rate, like a camera
    recent: OrderedDict[int, object] = OrderedDict()  # the frames an answer may still refer to (for --annotate)
    writer = None
    # gRPC reads the frames on its own thread; when the call fails early (a bad collection), the main
    # thread releases the capture while that thread may be inside cap.read(), and libavcodec aborts
    # the process. The lock keeps a read and the release apart; `closed` stops the reader.
    capture_lock, closed, reader_done = threading.Lock(), threading.Event(), threading.Event()

    def frames():
        try:
            yield from read_frames()
        finally:
            reader_done.set()

    def read_frames():
        n, t0 = 0, time.monotonic()
        while args.frames == 0 or n < args.frames:
            with capture_lock:
                if closed.is_set():
                    return
                ok, frame = cap.read()
            if not ok:
                return
            h, w = frame.shape[:2]
            if w > args.width:
                frame = cv2.resize(frame, (args.width, round(h * args.width / w)), interpolation=cv2.INTER_AREA)
            n += 1
            if args.annotate:
                recent[n] = frame
                while len(recent) > 64:
                    recent.popitem(last=False)
            if pace:
                time.sleep(max(0.0, t0 + n / fps - time.monotonic()))
            yield n, frame

    processed = skipped = 0
    latencies = []
    try:
        for a in c.stream_frames(
            frames(), collection=args.collection, identify=args.identify, liveness=args.liveness, max_fps=args.max_fps
        ):
            processed += 1
            skipped += len(a.skipped_frame_ids)
            latencies.append(a.latency_ms)
            if args.json:
                print(as_json(a, indent=None), flush=True)
            else:
                faces = "  ".join(
                    f"[track {f.track_id}"
                    + (f" {f.identity.subject_id} {f.identity.similarity:.2f}" if f.HasField("identity") else "")
                    + (f" {'live' if f.liveness.is_live else 'SPOOF'}" if f.HasField("liveness") else "")
                    + "]"
                    for f in a.faces
                )
                err = f"  error {a.error.reason}" if a.HasField("error") else ""
                print(
                    f"frame {a.frame_id:5d}  faces {len(a.faces)}  {faces}  skipped {len(a.skipped_frame_ids)}  "
                    f"{a.latency_ms:.1f} ms{err}",
                    flush=True,
                )
            if args.annotate and a.frame_id in recent:
                img = recent[a.frame_id].copy()
                for f in a.faces:
                    b = f.face.box
                    cv2.rectangle(img, (int(b.x), int(b.y)), (int(b.x + b.width), int(b.y + b.height)), (0, 200, 0), 2)
                    label = f"#{f.track_id} " + (f.identity.subject_id if f.HasField("identity") else "")
                    cv2.putText(img, label, (int(b.x), max(12, int(b.y) - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 200, 0), 1)
                if writer is None:
                    writer = cv2.VideoWriter(args.annotate, cv2.VideoWriter_fourcc(*"mp4v"), fps, (img.shape[1], img.shape[0]))
                writer.write(img)
    finally:
        closed.set()
        reader_done.wait(0.5)  # gRPC's reading thread, if it is still in the generator, leaves it first
        with capture_lock:
            cap.release()
        if writer is not None:
            writer.release()
    lat = sorted(latencies) or [0.0]
    print(f"processed {processed} frames, skipped {skipped}; latency p50 {lat[len(lat) // 2]:.1f} ms", file=sys.stderr)
    return 0


# -- the parser -------------------------------------------------------------------------
POSITIONAL_HELP = {
    "image": "photo file (JPEG, PNG, WebP or BMP)",
    "first": "first photo file",
    "second": "second photo file",
    "collection": "collection id",
    "subject": "subject id",
    "dir": "folder with one sub-folder of photos per subject",
    "source": "video file, or a camera's device number",
    "key_id": "key id (from `keys list`)",
    "pairs": "CSV of labelled pairs: file_a,file_b,same (1/0), paths relative to the CSV (LFW's pairs.csv format)",
    "face_id": "face id (from `subjects get`)",
}
ADD_FACE = "add another face to an existing subject"
SKIP_LIVENESS = "skip the liveness check (only in collections whose policy is OPTIONAL)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="facesvc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--target",
        default=os.environ.get("FACESVC_TARGET", "localhost:50051"),
        help="server address host:port (env FACESVC_TARGET)",
    )
    ap.add_argument(
        "--api-key", default=os.environ.get("FACESVC_API_KEY", ""), help="API key sent as x-api-key (env FACESVC_API_KEY)"
    )
    ap.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca)")
    ap.add_argument("--ca", help="PEM CA bundle that signed the server's certificate")
    ap.add_argument("--cert", help="client certificate (mTLS)")
    ap.add_argument("--key", help="client private key (mTLS)")
    ap.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    ap.add_argument(
        "--proto-names",
        action="store_true",
        help="print JSON with the .proto field names (staging_token) instead of the JSON mapping's (stagingToken, as grpcurl)",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    def cmd(name, help_, *args):
        p = sub.add_parser(name, help=help_)
        for a in args:
            p.add_argument(a, help=POSITIONAL_HELP[a])
        return p

    cmd("health", "the server's health (grpc.health.v1)")
    cmd("detect", "faces in a photo", "image")
    cmd("liveness", "is the face live or a spoof?", "image")
    cmd("compare", "similarity of the faces of two photos", "first", "second")
    cmd("analyze", "age and gender of each face", "image")
    p = cmd("process", "check and stage an enrolment photo (then: register --token)", "collection", "subject", "image")
    p.add_argument("--add-face", action="store_true", help=ADD_FACE)
    p.add_argument("--skip-liveness", action="store_true", help=SKIP_LIVENESS)
    p = cmd("register", "commit a staged face (--token) or enrol a photo (--image)", "collection", "subject")
    p.add_argument("--token", default="", help="the staging token from `process`")
    p.add_argument("--image", help="enrol this photo in one call instead of a staged face")
    p.add_argument("--add-face", action="store_true", help=ADD_FACE)
    p.add_argument("--skip-liveness", action="store_true", help=SKIP_LIVENESS)
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="subject metadata; repeat for more")
    cmd("verify", "is this the registered subject? (1:1)", "collection", "subject", "image")
    p = cmd("search", "who is this? (1:N)", "collection", "image")
    p.add_argument("--top-k", type=int, default=5, help="most subjects to answer (1-100)")
    p.add_argument(
        "--min-similarity",
        type=float,
        default=0.0,
        help="lowest similarity of a match; 0 = the server's 1:N threshold (never below its floor)",
    )
    p.add_argument("--all-faces", action="store_true", help="search every face of the photo, not only the largest")
    p = cmd("enroll", "bulk enrolment of DIR/<subject id>/<photos> through RegisterBatch", "collection", "dir")
    p.add_argument("--skip-liveness", action="store_true", help="for trusted photos in a LIVENESS_POLICY_OPTIONAL collection")
    p = cmd(
        "calibrate",
        "threshold at a target FAR from labelled pairs of a collection's population (CSV: file_a,file_b,same)",
        "collection",
        "pairs",
    )
    p.add_argument("--far", type=float, default=1e-3, help="target false accept rate, e.g. 0.001")
    p.add_argument(
        "--apply",
        choices=("match", "search"),
        help="set the result as the collection's 1:1 (match) or 1:N (search) threshold (admin key)",
    )
    p = cmd("similar", "other subjects that look like a stored face (find-similar)", "collection", "face_id")
    p.add_argument("--top-k", type=int, default=5, help="most subjects to answer (1-100)")
    p = cmd("group", "cluster photos (or, with none, the collection's faces) into people", "collection")
    p.add_argument("photos", nargs="*", help="photos to group; none = the collection's stored faces")
    p.add_argument("--min-similarity", type=float, default=0.0, help="link threshold; 0 = the collection's 1:N threshold")
    p = cmd("stream", "stream a video file or camera (device number) and print each answer", "source")
    p.add_argument("--collection", default="", help="collection to identify faces in (with --identify)")
    p.add_argument("--identify", action="store_true", help="search each track's face in --collection")
    p.add_argument("--liveness", action="store_true", help="check each track's liveness")
    p.add_argument("--max-fps", type=float, default=0.0, help="frames the server processes a second; 0 = as many as it can")
    p.add_argument("--frames", type=int, default=0, help="stop after this many frames (0 = all)")
    p.add_argument("--width", type=int, default=640, help="downscale frames to this width before sending")
    p.add_argument("--no-pace", action="store_true", help="send a file's frames as fast as possible")
    p.add_argument("--annotate", metavar="OUT.mp4", help="write the answered frames with boxes and identities")
    p.add_argument("--json", action="store_true", help="one JSON answer per line")
    for group, actions in (
        ("collections", ("list", "create", "get", "update", "delete")),
        ("subjects", ("list", "get", "delete")),
        ("keys", ("create", "list", "delete")),
    ):
        g = sub.add_parser(group, help=f"manage {group}").add_subparsers(dest="action", required=True)
        for action in actions:
            p = g.add_parser(action, help=f"{action} {group}")
            if group == "collections" and action != "list" or group in ("subjects", "keys"):
                p.add_argument("collection", help=POSITIONAL_HELP["collection"])
            if (group, action) in (("subjects", "get"), ("subjects", "delete")):
                p.add_argument("subject", help=POSITIONAL_HELP["subject"])
            if (group, action) == ("keys", "delete"):
                p.add_argument("key_id", help=POSITIONAL_HELP["key_id"])
            if (group, action) == ("collections", "create"):
                p.add_argument("--display-name", default="", help="a name for people")
                p.add_argument(
                    "--liveness-optional",
                    action="store_true",
                    help="let requests skip liveness (trusted bulk imports); default: liveness REQUIRED",
                )
            if (group, action) == ("collections", "update"):
                p.add_argument(
                    "--duplicate-policy", choices=("reject", "warn", "off"), help="what enrolling a duplicate face does"
                )
                for name in ("match", "search", "liveness"):
                    p.add_argument(
                        f"--{name}-threshold", type=float, help=f"the collection's {name} threshold; 0 = the server's default"
                    )
            if (group, action) == ("keys", "create"):
                p.add_argument("--description", default="", help="what the key is for (shown in `keys list`)")
    return ap


def run(c: FaceClient, args) -> int:
    a, cmd = args, args.command
    if cmd == "health":
        print(c.health())
    elif cmd == "detect":
        show(c.detect(a.image))
    elif cmd == "liveness":
        show(c.check_liveness(a.image))
    elif cmd == "compare":
        show(c.compare(a.first, a.second))
    elif cmd == "analyze":
        show(c.analyze(a.image))
    elif cmd == "process":
        show(c.process(a.collection, a.subject, a.image, add_face=a.add_face, skip_liveness=a.skip_liveness))
    elif cmd == "register":
        if bool(a.token) == bool(a.image):
            raise SystemExit("register: give exactly one of --token and --image")
        meta = dict(kv.split("=", 1) for kv in a.metadata)
        show(
            c.register(
                a.collection,
                a.subject,
                staging_token=a.token,
                image=a.image,
                add_face=a.add_face,
                skip_liveness=a.skip_liveness,
                metadata=meta,
            )
        )
    elif cmd == "verify":
        show(c.verify(a.collection, a.subject, a.image))
    elif cmd == "search":
        show(c.search(a.collection, a.image, top_k=a.top_k, min_similarity=a.min_similarity, all_faces=a.all_faces))
    elif cmd == "enroll":
        return enroll(c, a)
    elif cmd == "calibrate":
        return calibrate(c, a)
    elif cmd == "similar":
        show(c.find_similar(a.collection, a.face_id, top_k=a.top_k))
    elif cmd == "group":
        photos = {p: Path(p) for p in a.photos}
        show(c.group_faces(a.collection, photos, min_similarity=a.min_similarity, timeout=None))
    elif cmd == "stream":
        return stream(c, a)
    elif cmd == "collections":
        if a.action == "list":
            show(list(c.list_collections()))
        elif a.action == "create":
            show(c.create_collection(a.collection, display_name=a.display_name, liveness_optional=a.liveness_optional))
        elif a.action == "get":
            show(c.get_collection(a.collection))
        elif a.action == "update":
            show(
                c.update_collection(
                    a.collection,
                    duplicate_policy=a.duplicate_policy,
                    match_threshold=a.match_threshold,
                    search_threshold=a.search_threshold,
                    liveness_threshold=a.liveness_threshold,
                )
            )
        else:
            show(c.delete_collection(a.collection))
    elif cmd == "subjects":
        if a.action == "list":
            show(list(c.list_subjects(a.collection)))
        elif a.action == "get":
            show(c.get_subject(a.collection, a.subject))
        else:
            print(json.dumps({field_name("deleted_faces"): c.delete_subject(a.collection, a.subject)}))
    elif cmd == "keys":
        if a.action == "create":
            show(c.create_api_key(a.collection, a.description))
        elif a.action == "list":
            show(list(c.list_api_keys(a.collection)))
        else:
            c.delete_api_key(a.collection, a.key_id)
            print(json.dumps({"deleted": a.key_id}))
    return 0


def main(argv: list[str] | None = None) -> int:
    global PROTO_NAMES
    args = build_parser().parse_args(argv)
    PROTO_NAMES = args.proto_names
    try:
        with client_from(args) as c:
            return run(c, args)
    except FaceServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
