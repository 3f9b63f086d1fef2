// facesvc client for Node.js: the FaceService stub from protos/ (no generated code), with the
// API key sent on every call, promises for the unary calls, async iterators for the streams, and
// errors that carry the server's ErrorInfo.
//
//   import { connect, ErrorReason } from "./clients/node/facesvc.js";   // ESM (.mjs); CommonJS: require()
//   const fs = connect("localhost:50051", { apiKey: process.env.FACESVC_API_KEY });
//   const res = await fs.Detect({ image: { encoded: readFileSync("face.jpg") } });
//   for await (const r of fs.registerBatch([["a.jpg", { collection: "office", subject_id: "alice", image }]])) ...
//   for await (const answer of fs.streamFrames(frames, { collection: "office", identify: true })) ...
//
// A failed call rejects (or, in a stream, throws) a gRPC error with these fields added:
//   e.reason         the ErrorInfo reason, one of ErrorReason ("" when the server sent none)
//   e.errorMetadata  the ErrorInfo metadata map, e.g. { field: "image" } ({} when none)
//   e.errorInfo      { reason, domain, metadata } as decoded
//   e.codeName       the status code's name ("INVALID_ARGUMENT"); e.code is its number
// (e.metadata is grpc-js's trailing gRPC Metadata object, not the ErrorInfo map.)
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");

// google.rpc.Status and ErrorInfo, enough to read the grpc-status-details-bin trailer.
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    rpc: {
      nested: {
        AnyLite: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
        Status: {
          fields: {
            code: { type: "int32", id: 1 },
            message: { type: "string", id: 2 },
            details: { rule: "repeated", type: "AnyLite", id: 3 },
          },
        },
        ErrorInfo: {
          fields: {
            reason: { type: "string", id: 1 },
            domain: { type: "string", id: 2 },
            metadata: { keyType: "string", type: "string", id: 3 },
          },
        },
      },
    },
  },
});
const Status = rpcTypes.lookupType("rpc.Status");

// Every reason the server can send, from the contract's ErrorReason enum (name -> name).
const ErrorReason = Object.freeze(Object.fromEntries(
  Object.keys(protobuf.loadSync(path.join(PROTOS, "facesvc/v1/error_reason.proto")).lookupEnum("facesvc.v1.ErrorReason").values)
    .filter((name) => name !== "ERROR_REASON_UNSPECIFIED").map((name) => [name, name])));
const ErrorInfo = rpcTypes.lookupType("rpc.ErrorInfo");

/**
 * @typedef {{ reason: string, domain: string, metadata: Object<string, string> }} ErrorInfoFields
 * @typedef {Error & { code: number, codeName: string, reason: string, errorMetadata: Object<string, string>,
 *                     errorInfo: ErrorInfoFields }} FaceServiceError
 */

/** The ErrorInfo of a failed call (reason "", metadata {} when the server sent none). @returns {ErrorInfoFields} */
function errorInfo(err) {
  const none = { reason: "", domain: "", metadata: {} };
  const raw = err.metadata && err.metadata.get && err.metadata.get("grpc-status-details-bin")[0];
  if (!raw) return none;
  const status = Status.decode(raw);
  for (const d of status.details) {
    if (d.type_url.endsWith("google.rpc.ErrorInfo")) {
      const info = ErrorInfo.decode(d.value);
      return { reason: info.reason, domain: info.domain, metadata: info.metadata || {} };
    }
  }
  return none;
}

/** The gRPC error with its ErrorInfo attached (see the header). @returns {FaceServiceError} */
function withErrorInfo(err) {
  if (err.errorInfo) return err;
  const info = errorInfo(err);
  err.errorInfo = info;
  err.reason = info.reason;
  err.errorMetadata = info.metadata;
  err.codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
  return err;
}

/** Photo bytes (a Buffer/Uint8Array) become an Image; an Image ({encoded} or {raw}) passes. */
function asImage(image) {
  return image instanceof Uint8Array ? { encoded: image } : image;
}

function loadService() {
  const def = protoLoader.loadSync("facesvc/v1/face_service.proto", {
    includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(def).facesvc.v1.FaceService;
}

/**
 * A FaceService client whose unary methods return promises.
 * options: apiKey, tls (boolean), rootCerts (Buffer), deadlineMs (default 30000).
 */
function connect(target, options = {}) {
  const Service = loadService();
  const creds = options.tls || options.rootCerts
    ? grpc.credentials.createSsl(options.rootCerts || null) : grpc.credentials.createInsecure();
  const stub = new Service(target, creds, {
    "grpc.max_receive_message_length": 32 << 20, "grpc.max_send_message_length": 32 << 20,
  });
  const deadlineMs = options.deadlineMs || 30000;
  const metadata = () => {
    const md = new grpc.Metadata();
    if (options.apiKey) md.set("x-api-key", options.apiKey);
    return md;
  };
  const client = { stub, close: () => stub.close() };
  for (const [name, method] of Object.entries(Service.service)) {
    if (method.requestStream || method.responseStream) continue; // streams: the helpers below
    client[name] = (request) => new Promise((resolve, reject) => {
      stub[name](request, metadata(), { deadline: Date.now() + deadlineMs }, (err, res) => {
        if (err) reject(withErrorInfo(err));
        else resolve(res);
      });
    });
  }

  /**
   * A bidirectional call: `requests` (an iterable or async iterable) is written as the server
   * reads it (backpressure), the answers are yielded as they come. Leaving the loop early
   * cancels the call. streamOptions.deadlineMs bounds the whole stream (default: none);
   * streamOptions.onEnd runs when the call is over (to release a writer that waits on answers).
   */
  async function* bidi(name, requests, streamOptions = {}) {
    const callOptions = streamOptions.deadlineMs ? { deadline: Date.now() + streamOptions.deadlineMs } : {};
    const call = stub[name](metadata(), callOptions);
    call.on("error", () => {}); // the loop below gets the error; this keeps a late one from being "unhandled"
    let writeError = null;
    let ended = false;
    const writing = (async () => {
      try {
        for await (const request of requests) {
          if (ended) return;
          if (!call.write(request)) await new Promise((resolve) => call.once("drain", resolve));
        }
        call.end();
      } catch (err) {
        writeError = err; // e.g. a photo that could not be read: the call goes no further
        call.cancel();
      }
    })();
    try {
      for await (const response of call) yield response;
    } catch (err) {
      if (writeError) throw writeError;
      throw withErrorInfo(err);
    } finally {
      ended = true;
      call.cancel(); // a no-op once the server has closed the call
      if (streamOptions.onEnd) streamOptions.onEnd();
      await writing;
    }
    if (writeError) throw writeError;
  }

  /**
   * StreamFrames: `frames` (an iterable or async iterable) yields photos (Buffer), Images
   * ({encoded} / {raw}) or { frame_id, image, capture_time }; frame ids count from 1 when not
   * given. Yields one StreamFramesResponse per processed frame. The server keeps only the two newest
   * frames it has not started on (a camera need not pace itself; skipped_frame_ids lists the rest);
   * waitForAnswers: true sends each frame only after the previous one's answer, so every frame
   * is processed (files, tests). config: the StreamConfig fields (collection, identify, liveness,
   * max_fps, min_similarity, face_options), plus deadlineMs and waitForAnswers.
   */
  client.streamFrames = (frames, config = {}) => {
    const { deadlineMs: streamDeadline, waitForAnswers = false, ...streamConfig } = config;
    let answered = 0; // the highest frame id answered (or skipped) so far
    let wake = () => {};
    const progress = (id) => {
      answered = Math.max(answered, id);
      wake();
    };
    async function* requests() {
      yield { config: streamConfig };
      let next = 1;
      for await (const f of frames) {
        const frame = f && f.image !== undefined ? { frame_id: next, ...f, image: asImage(f.image) } : { frame_id: next, image: asImage(f) };
        next = Number(frame.frame_id) + 1;
        yield { frame };
        while (waitForAnswers && answered < Number(frame.frame_id)) await new Promise((resolve) => (wake = resolve));
      }
    }
    const onEnd = () => progress(Infinity);
    return (async function* answers() {
      for await (const answer of bidi("StreamFrames", requests(), { deadlineMs: streamDeadline, onEnd })) {
        progress(Number(answer.frame_id));
        yield answer;
      }
    })();
  };

  /** The items of a batch: [item_id, request] pairs or { item_id, <field>: request } objects. */
  async function* batchItems(items, field) {
    for await (const item of items) yield Array.isArray(item) ? { item_id: item[0], [field]: item[1] } : item;
  }

  /** RegisterBatch: items of RegisterRequests in, one RegisterBatchResponse per item out, in order. */
  client.registerBatch = (items, streamOptions) => bidi("RegisterBatch", batchItems(items, "register"), streamOptions);
  /** ProcessBatch: items of ProcessRequests in, one ProcessBatchResponse per item out, in order. */
  client.processBatch = (items, streamOptions) => bidi("ProcessBatch", batchItems(items, "process"), streamOptions);
  return client;
}

module.exports = { connect, errorInfo, withErrorInfo, ErrorReason, PROTOS };
