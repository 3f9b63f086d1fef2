"""One small class per ONNX model: preprocess -> session.run -> postprocess.

`registry.build(name, ...)` reads the model manifest and returns the wrapper
for that model's `arch`, so changing the detector or recognizer is a setting.
"""
