"""Self-contained compute kernels (installed as ``fasteval.kernels``; no imports from fasteval)."""
