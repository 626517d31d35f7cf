"""Pipelines of gspn-diffusers (installed as ``gspn_diffusers.pipelines``)."""

# A saved pipeline's model_index.json names its ``gspn`` component ["gspn_diffusers.adapter", "GSPNAdapter"];
# diffusers resolves a library outside its own only from sys.modules, so the module must be imported
# whenever the pipeline class is.
from gspn_diffusers import adapter as _adapter  # noqa: F401

from .pipeline_gspn_sdxl import GSPNPipelineOutput, GSPNStableDiffusionXLPipeline
from .planning import Plan, StagePlan, Unit, VaePlan

__all__ = ["GSPNStableDiffusionXLPipeline", "GSPNPipelineOutput", "Plan", "StagePlan", "Unit", "VaePlan"]
