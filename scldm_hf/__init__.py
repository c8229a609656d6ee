"""scldm-hf: scLDM (single-cell latent diffusion) as a Hugging Face-native package.

Stage 1 is a permutation-invariant VAE (``SCVAEModel``, a ``transformers.PreTrainedModel``); stage 2 a
flow-matching Diffusion Transformer on its latents, shipped as ``SCLDMPipeline`` (a
``diffusers.DiffusionPipeline``). Heavy submodules are imported on first use.
"""

from scldm_hf.lazy_exports import lazy_getattr
from scldm_hf.version import package_version

__version__ = package_version()

_EXPORTS = {
    "SCLDMError": "scldm_hf.errors",
    "InputDataError": "scldm_hf.errors",
    "VocabularyError": "scldm_hf.errors",
    "ConditionError": "scldm_hf.errors",
    "CheckpointError": "scldm_hf.errors",
    "ConfigurationError": "scldm_hf.errors",
    "GeneVocab": "scldm_hf.data",
    "CellCollator": "scldm_hf.data",
    "load_pbmc68k_counts": "scldm_hf.data",
    "anndata_to_dataset": "scldm_hf.data",
    "anndata_to_corpus": "scldm_hf.data",
    "load_corpus": "scldm_hf.data",
    "SCVAEConfig": "scldm_hf.models",
    "SCVAEModel": "scldm_hf.models",
    "LatentDiTTransformer": "scldm_hf.models.transformer_latent_dit",
    "CellConditioner": "scldm_hf.models.conditioning",
    "SCLDMPipeline": "scldm_hf.pipelines",
    "SCLDMPipelineOutput": "scldm_hf.pipelines",
    "SCLDMCounterfactualPipeline": "scldm_hf.pipelines",
    "FlowMatchODESolverScheduler": "scldm_hf.pipelines",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__():
    return __all__
