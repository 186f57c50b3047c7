"""Tools built on the model and runtime: convert, ONNX export, bench, eval, parity, MTP training, report files."""
