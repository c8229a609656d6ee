"""scLDM models. Importing this package registers the VAE with the transformers Auto classes.

`AutoModel.from_pretrained(path)` then loads a saved `SCVAEModel` in-process; saved checkpoints also carry the model
code and an `auto_map` (`SCVAEModel.save_pretrained`), so `AutoModel.from_pretrained(path, trust_remote_code=True)`
works where `scldm_hf` is not installed.
"""

from transformers import AutoConfig, AutoModel

from .configuration_scvae import SCVAEConfig
from .modeling_scvae import (
    SCVAEDecoderOutput,
    SCVAEEncoderOutput,
    SCVAEModel,
    SCVAEOutput,
    negative_binomial_log_prob,
    sample_negative_binomial,
)

AutoConfig.register(SCVAEConfig.model_type, SCVAEConfig, exist_ok=True)
AutoModel.register(SCVAEConfig, SCVAEModel, exist_ok=True)

__all__ = [
    "SCVAEConfig",
    "SCVAEDecoderOutput",
    "SCVAEEncoderOutput",
    "SCVAEModel",
    "SCVAEOutput",
    "negative_binomial_log_prob",
    "sample_negative_binomial",
]
