"""gspn-diffusers: GSPN-2 line-scan propagation in place of SDXL's self-attention.

Public API (imported lazily, so that ``import gspn_diffusers`` stays cheap):
    gspn_propagate                  the GSPN-2 op (gspn_diffusers.ops)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "gspn_propagate": "gspn_diffusers.ops",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gspn_diffusers' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
