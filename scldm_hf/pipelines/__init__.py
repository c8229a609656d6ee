"""Diffusers pipelines of scldm-hf."""

from .pipeline_scldm import SCLDMPipeline, SCLDMPipelineOutput
from .pipeline_scldm_counterfactual import SCLDMCounterfactualPipeline
from .streaming import generate_to_file

__all__ = ["SCLDMCounterfactualPipeline", "SCLDMPipeline", "SCLDMPipelineOutput", "generate_to_file"]
