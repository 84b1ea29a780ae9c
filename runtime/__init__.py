"""runtime: the on-device side. Loads a bundle and generates with ONNX Runtime.

This package is the leaf of moe2edge: it imports nothing else of ours and never
imports torch or transformers, so it installs on a Jetson with onnxruntime (or
TensorRT), numpy, tokenizers and the web stack only (`pip install moe2edge[runtime]`).

    from moe2edge.runtime import Generator, SamplingParams
    gen = Generator.from_bundle("runs/demo/bundles/fp32")
    for piece in gen.stream(gen.encode_prompt("turn on the kitchen lights")):
        print(piece, end="", flush=True)
"""

from moe2edge.runtime.engine import KVCache, OnnxEngine, open_engine
from moe2edge.runtime.errors import BundleError, ContextOverflowError, RuntimeUserError
from moe2edge.runtime.generate import GenerationResult, Generator
from moe2edge.runtime.manifest import read_manifest, verify_bundle
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.session import Conversation, PrefixStore, render_chat

__all__ = [
    "BundleError",
    "Conversation",
    "ContextOverflowError",
    "GenerationResult",
    "Generator",
    "KVCache",
    "OnnxEngine",
    "PrefixStore",
    "RuntimeUserError",
    "SamplingParams",
    "open_engine",
    "read_manifest",
    "render_chat",
    "verify_bundle",
]
