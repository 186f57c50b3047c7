"""onnxruntime: runs the whole exported model graph (``dsv3 export onnx``) with ONNX Runtime."""
