"""lowbit-harness: compare 3-, 2- and 1-bit weight quantization methods honestly.

The core (quant, train, eval, store) imports without ray, streamlit, plotly or lm-eval.
"""

__version__ = "0.1.0"
