"""ParetoQ (Liu et al. 2025, arXiv 2502.02631) for lowbit-harness, as an out-of-tree plugin.

Installed, it declares the method ``paretoq`` (entry-point group ``harness.methods``) and the
formats ``seq``, ``seq_ternary`` and ``lsq`` (group ``harness.formats``); the harness imports
this package only when one of those names is looked up.
"""
