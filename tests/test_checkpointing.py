"""Gradient checkpointing through the libraries' switches (`gradient_checkpointing_enable` of transformers for the
VAE, `enable_gradient_checkpointing` of diffusers for the DiT) gives the gradients of a plain backward pass."""

import pytest
import torch

from scldm_hf.data import CellCollator
from scldm_hf.models import SCVAEConfig, SCVAEModel
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gradients(model: torch.nn.Module, loss_of) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(checkpointed: dict, plain: dict) -> None:
    assert checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)


def test_vae_gradient_checkpointing_gives_the_same_gradients(tiny_dataset):
    dataset, info = tiny_dataset
    batch = CellCollator.from_corpus_info(info, covariates=[])(list(dataset))
    torch.manual_seed(0)
    vae = SCVAEModel(SCVAEConfig(gene_names=info.genes, hidden_size=16, num_latent_tokens=4, latent_dim=4,
                                 kl_weight=0.1)).train()

    def loss_of(model):
        return model(**batch, generator=torch.Generator().manual_seed(0)).loss

    plain = gradients(vae, loss_of)
    vae.gradient_checkpointing_enable()
    assert vae.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in vae.encoder.layers)
    assert_same_gradients(gradients(vae, loss_of), plain)


def test_dit_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    transformer = LatentDiTTransformer(num_latent_tokens=4, latent_dim=4, hidden_size=16, num_layers=2,
                                       num_attention_heads=2, timestep_embedding_dim=16,
                                       covariate_num_labels={"cell_type": 3})
    for parameter in transformer.parameters():  # adaLN-Zero starts at zero: move off it so every weight gets a gradient
        torch.nn.init.normal_(parameter, std=0.1)
    latents, timestep = torch.randn(5, 4, 4), torch.rand(5) * 1000
    labels = {"cell_type": torch.tensor([0, 1, 2, 3, 0])}

    def loss_of(model):
        return model(latents, timestep, labels).sample.pow(2).mean()

    plain = gradients(transformer, loss_of)
    transformer.enable_gradient_checkpointing()
    assert transformer.is_gradient_checkpointing
    assert_same_gradients(gradients(transformer, loss_of), plain)
