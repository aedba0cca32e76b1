"""Pruning (issue 4).

- masks.py: pure math: magnitude / Wanda scores, exact unstructured and N:M masks, OWL layer ratios.
- sparsegpt.py: SparseGPT's blocked OBS solve on (W, H), H shared with GPTQ.
- unstructured.py: Observers for core.calibrate (magnitude, Wanda, SparseGPT, OWL statistics) and prune_model():
  weights zeroed in place, the model stays an ordinary float model.
- sparse.py: SparseLinear (blocked CSR with a fast CPU matmul, bitmask + values, compact N:M, CUDA 2:4
  semi-structured) and compress_sparse().
- structured.py: MLP channels / attention heads / decoder layers removed from Llama-family models; the result
  saves and reloads as a plain transformers checkpoint.
"""
from .sparse import SparseLinear, compress_sparse
from .structured import structured_prune
from .unstructured import prune_model

__all__ = ["SparseLinear", "compress_sparse", "prune_model", "structured_prune"]
