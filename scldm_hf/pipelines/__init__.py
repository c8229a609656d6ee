"""Diffusers pipelines of scldm-hf."""

from .pipeline_scldm import SCLDMPipeline, SCLDMPipelineOutput
from .pipeline_scldm_counterfactual import SCLDMCounterfactualPipeline
from .scheduling_flow_match_ode import FlowMatchODESolverScheduler
from .streaming import generate_to_file

__all__ = [
    "FlowMatchODESolverScheduler",
    "SCLDMCounterfactualPipeline",
    "SCLDMPipeline",
    "SCLDMPipelineOutput",
    "generate_to_file",
]
