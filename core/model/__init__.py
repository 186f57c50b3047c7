"""The model graph, written once for every backend: its config, rotary tables, checkpoint tensor names,
how it is split across ranks, its KV cache and the Transformer that calls the backend's operators."""
