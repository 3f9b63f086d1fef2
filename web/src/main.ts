// The facesvc web console: the FaceService from the browser over Connect (binary), same origin.
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { type Face, FaceService, type Liveness } from "./gen/facesvc/v1/face_service_pb";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const apiKey = $<HTMLInputElement>("api-key");
const photoInput = $<HTMLInputElement>("photo");
const video = $<HTMLVideoElement>("video");
const canvas = $<HTMLCanvasElement>("canvas");
const statusLine = $("status");
const resultLine = $("result");
const errorBox = $("error");
const collectionInput = $<HTMLInputElement>("collection");
const subjectInput = $<HTMLInputElement>("subject");
const hidePhoto = $<HTMLInputElement>("hide-photo");
const PAGE_SIZE = 5;
const HIDDEN_PHOTO = "#3a3d44"; // the background the faces are drawn on when the photo is hidden

apiKey.value = localStorage.getItem("facesvc.apiKey") ?? "";
apiKey.addEventListener("change", () => localStorage.setItem("facesvc.apiKey", apiKey.value));
collectionInput.value = localStorage.getItem("facesvc.collection") ?? "";

const withKey: Interceptor = (next) => (req) => {
  if (apiKey.value) req.header.set("x-api-key", apiKey.value);
  return next(req);
};
const client = createClient(
  FaceService,
  createConnectTransport({ baseUrl: location.origin, useBinaryFormat: true, interceptors: [withKey] }),
);

// -- errors: shown by their ErrorInfo reason ---------------------------------------------------
/** The `reason` (field 1) of the google.rpc.ErrorInfo detail of a Connect error, read from its bytes. */
function errorReason(err: ConnectError): string {
  for (const d of err.details) {
    if (!("type" in d) || d.type !== "google.rpc.ErrorInfo") continue;
    const r = new BinaryReader(d.value);
    while (r.pos < r.len) {
      const [field, wire] = r.tag();
      if (field === 1) return r.string();
      r.skip(wire);
    }
  }
  return Code[err.code].toUpperCase();
}

function showError(err: unknown) {
  const e = ConnectError.from(err);
  errorBox.hidden = false;
  errorBox.dataset.reason = errorReason(e);
  errorBox.textContent = `${errorReason(e)}: ${e.rawMessage}`;
}

async function run(what: string, work: () => Promise<void>) {
  errorBox.hidden = true;
  delete errorBox.dataset.reason;
  statusLine.textContent = `${what}…`;
  try {
    await work();
    statusLine.textContent = "";
  } catch (err) {
    statusLine.textContent = `${what} failed`;
    showError(err);
  }
}

// -- the photo: a file or a webcam frame -------------------------------------------------------
let photo: Uint8Array | null = null;
let bitmap: ImageBitmap | null = null;

async function usePhoto(blob: Blob) {
  photo = new Uint8Array(await blob.arrayBuffer());
  bitmap = await createImageBitmap(blob); // EXIF orientation applied, as the server applies it
  draw([], new Map());
  for (const id of ["detect", "enrol", "verify", "search"]) $<HTMLButtonElement>(id).disabled = false;
  await detect();
}

photoInput.addEventListener("change", () => {
  const file = photoInput.files?.[0];
  if (file) void run("Loading", () => usePhoto(file));
});

$("webcam").addEventListener("click", () =>
  run("Starting the webcam", async () => {
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { width: 1280, height: 720 } });
    video.hidden = false;
    $("capture").hidden = false;
  }),
);

$("capture").addEventListener("click", () =>
  run("Capturing", async () => {
    const grab = document.createElement("canvas");
    grab.width = video.videoWidth;
    grab.height = video.videoHeight;
    grab.getContext("2d")!.drawImage(video, 0, 0);
    const blob = await new Promise<Blob>((ok, fail) =>
      grab.toBlob((b) => (b ? ok(b) : fail(new Error("no frame"))), "image/jpeg", 0.92),
    );
    await usePhoto(blob);
  }),
);

const image = () => ({ source: { case: "encoded" as const, value: photo! } });

// -- faces drawn: boxes, landmarks, quality, liveness ------------------------------------------
let drawn: [Face[], Map<number, Liveness>] = [[], new Map()];
hidePhoto.addEventListener("change", () => draw(...drawn));

function draw(faces: Face[], liveness: Map<number, Liveness>) {
  if (!bitmap) return;
  drawn = [faces, liveness];
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const g = canvas.getContext("2d")!;
  if (hidePhoto.checked) {
    g.fillStyle = HIDDEN_PHOTO;
    g.fillRect(0, 0, canvas.width, canvas.height);
  } else {
    g.drawImage(bitmap, 0, 0);
  }
  const line = Math.max(2, Math.round(bitmap.width / 400));
  g.font = `${8 * line}px system-ui, sans-serif`;
  faces.forEach((f, i) => {
    const b = f.box!;
    const live = liveness.get(i);
    const color = live ? (live.isLive ? "#19c13a" : "#ff2d20") : "#ffd400";
    g.lineWidth = line;
    g.strokeStyle = color;
    g.strokeRect(b.x, b.y, b.width, b.height);
    g.fillStyle = "#00e5ff";
    const lm = f.landmarks;
    for (const p of lm ? [lm.leftEye, lm.rightEye, lm.nose, lm.mouthLeft, lm.mouthRight] : []) {
      if (!p) continue;
      g.beginPath();
      g.arc(p.x, p.y, 1.5 * line, 0, 2 * Math.PI);
      g.fill();
    }
    const label = `#${i + 1} q ${(f.quality?.score ?? 0).toFixed(2)}${live ? ` ${live.isLive ? "live" : "spoof"} ${live.score.toFixed(2)}` : ""}`;
    g.fillStyle = color;
    g.fillText(label, b.x, Math.max(8 * line, b.y - 2 * line));
  });
  canvas.dataset.faces = String(faces.length);
  const rows = faces.map((f, i) => {
    const b = f.box!;
    const live = liveness.get(i);
    const tr = document.createElement("tr");
    const cells = [
      `${i + 1}`,
      `${b.x.toFixed(0)}, ${b.y.toFixed(0)}, ${b.width.toFixed(0)}×${b.height.toFixed(0)}`,
      f.detectionScore.toFixed(2),
      (f.quality?.score ?? 0).toFixed(2),
      live ? `${live.isLive ? "live" : "spoof"} ${live.score.toFixed(2)}` : "–",
    ];
    for (const text of cells) tr.insertCell().textContent = text;
    if (live) tr.cells[4].className = live.isLive ? "live" : "spoof";
    return tr;
  });
  $("faces").querySelector("tbody")!.replaceChildren(...rows);
}

/** Every face (box, landmarks, quality), then liveness of the one a single-face RPC would pick (the largest). */
async function detect() {
  await run("Detecting", async () => {
    const found = await client.detect({ image: image() });
    const liveness = new Map<number, Liveness>();
    if (found.faces.length) {
      try {
        const live = await client.checkLiveness({ image: image() });
        const box = live.face?.box;
        const i = found.faces.findIndex((f) => box && Math.abs(f.box!.x - box.x) < 1 && Math.abs(f.box!.y - box.y) < 1);
        if (i >= 0 && live.liveness) liveness.set(i, live.liveness);
      } catch (err) {
        showError(err); // e.g. a face too small for liveness: the detection still stands
      }
    }
    draw(found.faces, liveness);
    resultLine.textContent = `${found.faces.length} face${found.faces.length === 1 ? "" : "s"} (${found.detector})`;
  });
}
$("detect").addEventListener("click", () => void detect());

// -- collection, enrolment, verification, search -----------------------------------------------
const collection = () => {
  localStorage.setItem("facesvc.collection", collectionInput.value.trim());
  return collectionInput.value.trim();
};

$("create").addEventListener("click", () =>
  run("Creating", async () => {
    const r = await client.createCollection({ collection: collection(), livenessPolicy: Number($<HTMLSelectElement>("policy").value) });
    resultLine.textContent = `collection ${r.collection?.collection ?? collection()} created`;
    await listSubjects("");
  }),
);

$("enrol").addEventListener("click", () =>
  run("Enrolling", async () => {
    const subjectId = subjectInput.value.trim();
    const staged = await client.process({ collection: collection(), subjectId, image: image() });
    const reg = await client.register({ collection: collection(), subjectId, source: { case: "stagingToken", value: staged.stagingToken } });
    resultLine.textContent = `enrolled ${subjectId}: ${reg.subject?.faceCount} face(s)${reg.subjectCreated ? ", new subject" : ""}`;
    await listSubjects("");
  }),
);

$("verify").addEventListener("click", () =>
  run("Verifying", async () => {
    const subjectId = subjectInput.value.trim();
    const v = await client.verify({ collection: collection(), subjectId, image: image() });
    resultLine.textContent = `${v.match ? "MATCH" : "NO MATCH"} ${subjectId}: similarity ${v.similarity.toFixed(3)} (threshold ${v.threshold.toFixed(3)})`;
    resultLine.dataset.match = String(v.match);
  }),
);

$("search").addEventListener("click", () =>
  run("Searching", async () => {
    const s = await client.search({ collection: collection(), image: image(), topK: 3 });
    const best = s.results[0]?.matches ?? [];
    resultLine.textContent = best.length
      ? `best: ${best.map((m) => `${m.subjectId} ${m.similarity.toFixed(3)}`).join(", ")}`
      : "no subject above the search threshold";
  }),
);

// -- subjects, a page at a time ------------------------------------------------------------------
const pages: string[] = []; // tokens of the pages before this one
let here = "";
let next = "";

async function listSubjects(token: string) {
  if (!collection()) return;
  const page = await client.listSubjects({ collection: collection(), pageSize: PAGE_SIZE, pageToken: token });
  if (!token) pages.length = 0;
  here = token;
  next = page.nextPageToken;
  const rows = page.subjects.map((s) => {
    const tr = document.createElement("tr");
    const updated = s.updateTime ? new Date(Number(s.updateTime.seconds) * 1000).toLocaleString() : "";
    for (const text of [s.subjectId, String(s.faceCount), updated]) tr.insertCell().textContent = text;
    return tr;
  });
  $("subjects").querySelector("tbody")!.replaceChildren(...rows);
  $<HTMLButtonElement>("next").disabled = !next;
  $<HTMLButtonElement>("prev").disabled = pages.length === 0;
}

$("next").addEventListener("click", () =>
  run("Listing", async () => {
    pages.push(here);
    await listSubjects(next);
  }),
);
$("prev").addEventListener("click", () => run("Listing", () => listSubjects(pages.pop() ?? "")));
$("refresh").addEventListener("click", () => run("Listing", () => listSubjects("")));
collectionInput.addEventListener("change", () => run("Listing", () => listSubjects("")));
if (collection()) void run("Listing", () => listSubjects(""));
