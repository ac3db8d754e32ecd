"""detr-jax: DETR (End-to-End Object Detection with Transformers) in JAX/Flax.

Data flow, one module each: data/ (input pipeline) -> models/ (backbone, position encoding,
transformer, heads) -> matching -> losses -> optimizer -> train / evaluate, with convert for the
official PyTorch weights.

    from detr_jax import build_model, convert
"""

import importlib

__version__ = "0.1.0"
__all__ = ["build_model", "convert"]


def __getattr__(name):
  # Lazy, so `import detr_jax` stays cheap and `convert` only needs torch when it reads a .pth.
  if name == "build_model":
    return importlib.import_module("detr_jax.models").build_model
  if name == "convert":
    return importlib.import_module("detr_jax.convert")
  raise AttributeError(f"module 'detr_jax' has no attribute {name!r}")
