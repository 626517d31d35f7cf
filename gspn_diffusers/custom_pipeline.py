"""The ``custom_pipeline`` entry for ``DiffusionPipeline.from_pretrained`` of a folder saved by
``GSPNStableDiffusionXLPipeline``::

    import gspn_diffusers.custom_pipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=gspn_diffusers.custom_pipeline.__file__,
                                             trust_remote_code=True)

diffusers copies this file into its modules cache and imports it (hence ``trust_remote_code``); its one
pipeline class is the installed ``GSPNStableDiffusionXLPipeline`` itself, not a copy.
"""

from gspn_diffusers.pipelines import GSPNStableDiffusionXLPipeline

__all__ = ["GSPNStableDiffusionXLPipeline"]
