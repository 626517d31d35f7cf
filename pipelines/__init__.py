"""Pipelines of gspn-diffusers (installed as ``gspn_diffusers.pipelines``)."""
