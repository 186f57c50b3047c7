"""Running a model: loading a checkpoint onto a backend (one pipeline), the Engine, plain and speculative
decoding, sampling, the tokenizer and its chat templates, several processes, and the OpenAI server."""
