"""The bundled serving engine: model code, Triton kernels, paged KV cache, the two phase loops, the server."""
