"""ONNX Runtime sessions and the ClipModel encoder."""
