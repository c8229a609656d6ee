"""Hub `custom_pipeline` entry point for scLDM.

Lets a Hub repository (or this folder) name the pipeline class for `DiffusionPipeline.from_pretrained`:

    DiffusionPipeline.from_pretrained("org/scldm-pbmc", custom_pipeline="path/to/pipelines/scldm")

The implementation lives in the installed `scldm_hf` package; this file only re-exports it.
"""

from scldm_hf.pipelines.pipeline_scldm import SCLDMPipeline, SCLDMPipelineOutput

__all__ = ["SCLDMPipeline", "SCLDMPipelineOutput"]
