"""The HTTP port: FaceService as Connect, gRPC-Web and JSON from the gRPC side's own servicer and interceptors
(calls.py), served by hypercorn with the web console's files (app.py). See docs/http.md."""
