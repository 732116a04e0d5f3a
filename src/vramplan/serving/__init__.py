"""Serving engines as workloads: what vLLM, SGLang and llama.cpp allocate, transcribed from their source.

:mod:`vramplan.serving.vllm` (and SGLang's token pool) works on a :class:`~vramplan.spec.ModelSpec`;
:mod:`vramplan.serving.llamacpp` on a GGUF file's header (:mod:`vramplan.gguf`).
"""
