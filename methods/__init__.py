"""Quantization methods, one module each; the interface they implement is ``harness.api``."""
