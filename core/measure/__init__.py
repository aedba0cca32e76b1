"""Measurements: accuracy (perplexity, KL and top-1 vs baseline), memory, latency, environment."""
