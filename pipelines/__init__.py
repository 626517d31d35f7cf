"""Pipelines of gspn-diffusers (installed as ``gspn_diffusers.pipelines``)."""

from .pipeline_gspn_sdxl import GSPNPipelineOutput, GSPNStableDiffusionXLPipeline
from .planning import Plan, StagePlan, Unit, VaePlan

__all__ = ["GSPNStableDiffusionXLPipeline", "GSPNPipelineOutput", "Plan", "StagePlan", "Unit", "VaePlan"]
