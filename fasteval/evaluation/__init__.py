"""Stage 3: the evaluators (the fast path, the plain PyTorch reference, the exact recheck) and the metrics."""
