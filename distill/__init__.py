"""Distillation of GSPN layers from a softmax teacher (installed as ``gspn_diffusers.distill``)."""
