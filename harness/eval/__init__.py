"""Evaluation: perplexity, memory, accuracy (lm-eval, imported lazily), saved models."""
