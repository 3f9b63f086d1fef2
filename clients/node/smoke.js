// The Node client's checks against a live server, run by tests/test_node_client.py:
// Detect, Verify (same person / another person) and a typed error, one JSON line each.
// env: FACESVC_TARGET, FACESVC_API_KEY, FACESVC_COLLECTION, FACESVC_SUBJECT,
//      PHOTO_SAME, PHOTO_OTHER, PHOTO_GROUP, PHOTO_NOFACE (paths)
"use strict";
const fs = require("fs");
const { connect } = require("./facesvc");

const env = process.env;
const image = (p) => ({ encoded: fs.readFileSync(p) });

(async () => {
  const c = connect(env.FACESVC_TARGET, { apiKey: env.FACESVC_API_KEY });
  const out = (o) => console.log(JSON.stringify(o));
  try {
    const det = await c.Detect({ image: image(env.PHOTO_GROUP) });
    out({ call: "Detect", faces: det.faces.length, detector: det.detector, width: det.image.width });
    for (const [label, photo] of [["same", env.PHOTO_SAME], ["other", env.PHOTO_OTHER]]) {
      const v = await c.Verify({ collection: env.FACESVC_COLLECTION, subject_id: env.FACESVC_SUBJECT, image: image(photo) });
      out({ call: "Verify", label, match: v.match, similarity: v.similarity, threshold: v.threshold });
    }
    try {
      await c.Verify({ collection: env.FACESVC_COLLECTION, subject_id: env.FACESVC_SUBJECT, image: image(env.PHOTO_NOFACE) });
      out({ call: "VerifyNoFace", error: null });
    } catch (e) {
      out({ call: "VerifyNoFace", code: e.codeName, reason: e.reason });
    }
  } finally {
    c.close();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
