"""Exporting a model for deployment: ONNX graphs with a parity check (`sdpipe.export.onnx`), sampling them with
onnxruntime (`sdpipe.export.onnx_pipeline`), and choosing the model (`sdpipe.export.source`)."""
