"""Diffusers pipelines of scldm-hf."""

from .pipeline_scldm import SCLDMPipeline, SCLDMPipelineOutput
from .pipeline_scldm_counterfactual import SCLDMCounterfactualPipeline

__all__ = ["SCLDMCounterfactualPipeline", "SCLDMPipeline", "SCLDMPipelineOutput"]
