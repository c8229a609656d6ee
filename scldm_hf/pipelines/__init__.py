"""Diffusers pipelines of scldm-hf."""

from .pipeline_scldm import SCLDMPipeline, SCLDMPipelineOutput
from .pipeline_scldm_counterfactual import SCLDMCounterfactualPipeline
from .scheduling_flow_match_ode import FlowMatchODESolverScheduler

__all__ = ["FlowMatchODESolverScheduler", "SCLDMCounterfactualPipeline", "SCLDMPipeline", "SCLDMPipelineOutput"]
