"""The gRPC layer: handlers, proto conversion, validation, auth, limits, reflection, status mapping."""
