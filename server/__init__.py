"""facesvc server: a gRPC face-recognition service, in layers (each imports only those below it).

    app.py, __main__.py   the composition root: settings -> stores, models, services, gRPC server
    assembly.py           its vision half: settings -> the models loaded once into one pipeline
                          (what evaluations and benchmarks import without the server)
    reembed.py, healthcheck.py
                          operator tools over it: re-embedding, the image's health probe
    rpc/                  gRPC glue: handlers per RPC group, proto conversion, validation, auth,
                          limits (messages arriving, calls, streams), messages that do not parse,
                          reflection, status mapping, the request-id/metrics interceptor
    web/                  the HTTP port: the same servicer and interceptors as Connect, gRPC-Web and
                          JSON (hypercorn: an ASGI gate that reads bodies in front of the WSGI app),
                          the web console's files, CORS
    domain/               identity lifecycle, collections and keys, 1:N search, live streams, tracking
    vision/ storage/ index/
                          the vision pipeline and its models; the SQL store and the staging cache;
                          the vector indexes (one per collection, a cache of the store)
    errors, records, context, telemetry, cpus, config
                          shared by all: the domain exception, plain records, the call context,
                          metrics and logs, the cores this process may keep busy, settings

tests/test_layers.py keeps the imports pointing downwards.
"""
