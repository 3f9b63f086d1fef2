// The Node client against a live server, end to end, one JSON line per step: RegisterBatch
// (streaming helper), Detect, Verify for the same and for another person, a typed error, and
// StreamFrames (streaming helper) over three photos. Run by tests/test_node_client.py.
//
//   npm run smoke        # against `make run` (localhost:50051, auth off), with the photos in ../shared/faces
//
// Every input has a default; override with:
//   FACESVC_TARGET (localhost:50051), FACESVC_API_KEY (none: `make run` has auth off),
//   FACESVC_FACES_DIR (../../../shared/faces from this file). It creates a collection of its own
//   (smoke-<random>) and deletes it at the end.
"use strict";
const fs = require("fs");
const path = require("path");
const crypto = require("crypto");
const { connect, ErrorReason } = require("./facesvc");

const env = process.env;
const faces = env.FACESVC_FACES_DIR || path.resolve(__dirname, "..", "..", "..", "shared", "faces");
const photo = (name) => fs.readFileSync(path.join(faces, "dev", name));
const out = (o) => console.log(JSON.stringify(o));

async function main() {
  const c = connect(env.FACESVC_TARGET || "localhost:50051", { apiKey: env.FACESVC_API_KEY });
  const collection = "smoke-" + crypto.randomBytes(3).toString("hex");
  try {
    await c.CreateCollection({ collection, liveness_policy: "LIVENESS_POLICY_OPTIONAL" });
    const items = [
      ["img1.jpg", { collection, subject_id: "person_01", image: { encoded: photo("img1.jpg") } }],
      ["noface_coffee.jpg", { collection, subject_id: "nobody", image: { encoded: photo("noface_coffee.jpg") } }],
    ];
    for await (const r of c.registerBatch(items)) {
      out({ call: "RegisterBatch", item: r.item_id, ok: !r.error, reason: r.error ? r.error.reason : "" });
    }
    const det = await c.Detect({ image: { encoded: photo("group_t1.jpg") } });
    out({ call: "Detect", faces: det.faces.length, detector: det.detector, width: det.image.width });
    for (const [label, name] of [["same", "img2.jpg"], ["other", "img13.jpg"]]) {
      const v = await c.Verify({ collection, subject_id: "person_01", image: { encoded: photo(name) } });
      out({ call: "Verify", label, match: v.match, similarity: v.similarity, threshold: v.threshold });
    }
    try {
      await c.Verify({ collection, subject_id: "person_01", image: { encoded: photo("noface_coffee.jpg") } });
      out({ call: "VerifyNoFace", error: null });
    } catch (e) {
      out({ call: "VerifyNoFace", code: e.codeName, reason: e.reason, typed: e.reason === ErrorReason.NO_FACE_DETECTED });
    }
    const frames = ["img1.jpg", "img2.jpg", "img13.jpg"].map(photo);
    const answers = [];
    for await (const a of c.streamFrames(frames, { collection, identify: true, waitForAnswers: true })) {
      answers.push({ frame: Number(a.frame_id), faces: a.faces.length, ids: a.faces.map((f) => (f.identity ? f.identity.subject_id : "")) });
    }
    out({ call: "StreamFrames", answers });
  } finally {
    await c.DeleteCollection({ collection }).catch(() => {});
    c.close();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
