"""Quantization methods, one module each; see ``methods/base.py`` for the interface."""
