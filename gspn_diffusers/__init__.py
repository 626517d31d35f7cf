"""gspn-diffusers: GSPN-2 line-scan propagation in place of SDXL's self-attention.

Public API (imported lazily, so that ``import gspn_diffusers`` stays cheap):
    gspn_propagate                  the GSPN-2 op (gspn_diffusers.ops)
    GSPN2AttnProcessor              GSPN-2 as a self-attention processor (gspn_diffusers.processor)
    GSPNAdapter                     a UNet's processors: save/load, mount/unmount (gspn_diffusers.adapter)
    hand_over_grid                  gives processors (or any receiver) each call's token grid (gspn_diffusers.token_grid)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "gspn_propagate": "gspn_diffusers.ops",
    "GSPN2AttnProcessor": "gspn_diffusers.processor",
    "GSPNAdapter": "gspn_diffusers.adapter",
    "hand_over_grid": "gspn_diffusers.token_grid",
    "GSPNStableDiffusionXLPipeline": "gspn_diffusers.pipelines",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gspn_diffusers' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
