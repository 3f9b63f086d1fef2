// facesvc client for Node.js: the FaceService stub from protos/ (no generated code), with the
// API key sent on every call, promises, and errors that carry the server's ErrorInfo reason.
//
//   const { connect } = require("./facesvc");
//   const fs = connect("localhost:50051", { apiKey: process.env.FACESVC_API_KEY });
//   const res = await fs.Detect({ image: { encoded: require("fs").readFileSync("face.jpg") } });
//   try { await fs.Verify(...) } catch (e) { if (e.reason === ErrorReason.SPOOF_DETECTED) console.log(e.errorMetadata) }
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

/** The ErrorInfo reason and metadata of a failed call ("" / {} when the server sent none). */
function errorInfo(err) {
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (!raw) return { reason: "", metadata: {} };
  const status = Status.decode(raw);
  for (const d of status.details) {
    if (d.type_url.endsWith("google.rpc.ErrorInfo")) {
      const info = ErrorInfo.decode(d.value);
      return { reason: info.reason, metadata: info.metadata || {} };
    }
  }
  return { reason: "", metadata: {} };
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
  const client = { stub, close: () => stub.close() };
  for (const [name, method] of Object.entries(Service.service)) {
    if (method.requestStream || method.responseStream) continue; // streams: use client.stub directly
    client[name] = (request) => new Promise((resolve, reject) => {
      const md = new grpc.Metadata();
      if (options.apiKey) md.set("x-api-key", options.apiKey);
      stub[name](request, md, { deadline: Date.now() + deadlineMs }, (err, res) => {
        if (!err) return resolve(res);
        const info = errorInfo(err);
        err.reason = info.reason;
        err.errorMetadata = info.metadata;
        err.codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
        reject(err);
      });
    });
  }
  return client;
}

module.exports = { connect, errorInfo, ErrorReason, PROTOS };
