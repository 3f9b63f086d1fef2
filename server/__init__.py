"""facesvc server: a gRPC face-recognition service.

Layout: `models/` holds one small class per ONNX model, `pipeline.py` strings
them together, `servicer.py` maps RPCs onto the pipeline, `app.py` wires the
gRPC server (health, reflection, lifecycle) and `__main__.py` starts it.
"""
