"""``absmax``: symmetric round-to-nearest with scale = max|w| / (2^(b-1) - 1) per group.

A plugin built from the harness's shared parts: RTN's prepare (conversion to ``QuantLinear``)
and finalize (packing), with a config whose defaults make the grid symmetric. With no zero
points in packed storage, the bits/weight the harness measures are lower than asymmetric RTN's.
"""

from __future__ import annotations

from pydantic import Field

from methods.rtn import RTN, RTNConfig


class AbsMaxConfig(RTNConfig):
    bits: int = Field(4, ge=2, le=8, description="weight bits (symmetric grid needs >= 2)")
    symmetric: bool = Field(True, description="absmax is symmetric by definition")


class AbsMax(RTN):
    """Symmetric absmax round-to-nearest per group (example plugin)."""

    Config = AbsMaxConfig
