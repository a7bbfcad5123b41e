"""runtime/: generation over the exported per-layer graphs (states, batching, sampling, streaming, MTP speculation).

    from qwen3next_trt.runtime import Generator, SamplingParams
    gen = Generator("out/tiny")                      # ONNX Runtime (CPU); engines_dir=... for TensorRT
    gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=16, mtp_k=2)
    for ev in gen.stream(prompts, max_new_tokens=16): print(ev.request, ev.token, ev.finished)

Imports numpy and onnxruntime only (no torch), so a serving process stays light.
"""

from .generator import MAX_DRAFTS, GenerationStats, Generator, TokenEvent
from qwen3next_trt.sessions import engine_factory, onnxrt_factory

from .graph_model import GraphModel
from .sampling import SamplingParams, choose
from .state import StateStore

__all__ = ["MAX_DRAFTS", "GenerationStats", "Generator", "TokenEvent", "GraphModel", "engine_factory", "onnxrt_factory",
           "SamplingParams", "choose", "StateStore"]
