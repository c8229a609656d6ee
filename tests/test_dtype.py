"""bfloat16 models on CPU: loading with `torch_dtype`, `.to(dtype)`, training and encoding a collator batch, both
pipelines generating counts (the negative binomial draw runs in float32 inside), and bf16 autocast training
(`mixed_precision: bf16`) with float32 weights and likelihood."""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from accelerate.state import AcceleratorState
from diffusers import FlowMatchEulerDiscreteScheduler

from scldm_hf.data import CellCollator
from scldm_hf.models import SCVAEConfig, SCVAEModel
from scldm_hf.models.modeling_scvae import negative_binomial_log_prob
from scldm_hf.models.conditioning import CellConditioner
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines import SCLDMCounterfactualPipeline, SCLDMPipeline
from scldm_hf.training import VAETrainingConfig, load_config
from scldm_hf.training import loop
from scldm_hf.training.loop import build_accelerator

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def batch(tiny_dataset):
    dataset, info = tiny_dataset
    batch = CellCollator.from_corpus_info(info, covariates=[])(list(dataset))
    return batch, info


@pytest.fixture
def pipeline(tiny_dataset) -> SCLDMPipeline:
    dataset, info = tiny_dataset
    torch.manual_seed(0)
    vae = SCVAEModel(SCVAEConfig(gene_names=info.genes, hidden_size=16, num_latent_tokens=4, latent_dim=4,
                                 encoder_layers=1, decoder_layers=1, num_attention_heads=2,
                                 dispersion="gene-cell"))
    conditioner = CellConditioner.from_dataset(dataset, ["cell_type", "condition"])
    transformer = LatentDiTTransformer(num_latent_tokens=4, latent_dim=4, hidden_size=16, num_layers=1,
                                       num_attention_heads=2, timestep_embedding_dim=16,
                                       covariate_num_labels=conditioner.num_labels)
    pipe = SCLDMPipeline(vae.eval(), transformer.eval(), FlowMatchEulerDiscreteScheduler(), conditioner)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bf16_vae_trains_and_encodes_a_collator_batch(batch):
    cells, info = batch
    vae = SCVAEModel(SCVAEConfig(gene_names=info.genes, hidden_size=16, num_latent_tokens=4, latent_dim=4))
    vae = vae.to(torch.bfloat16)
    output = vae(**cells)
    output.loss.backward()
    assert output.latents.dtype == torch.bfloat16
    assert output.mean.dtype == torch.float32 and torch.isfinite(output.loss)
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in vae.parameters() if p.grad is not None)
    float32_loss = vae.float()(**cells).loss
    torch.testing.assert_close(output.loss.float(), float32_loss.detach(), rtol=0.05, atol=0.5)


def test_from_pretrained_with_torch_dtype_loads_bf16_models(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path)
    vae = SCVAEModel.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)
    transformer = LatentDiTTransformer.from_pretrained(tmp_path / "transformer", torch_dtype=torch.bfloat16)
    assert vae.dtype == transformer.dtype == torch.bfloat16
    velocity = transformer(torch.randn(3, 4, 4, dtype=torch.bfloat16), torch.full((3,), 500.0)).sample
    assert velocity.dtype == torch.bfloat16 and velocity.shape == (3, 4, 4)

    loaded = SCLDMPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.vae.dtype == loaded.transformer.dtype == torch.bfloat16
    cells = loaded(num_cells=5, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).cells
    assert sp.isspmatrix_csr(cells.X) and cells.shape == (5, len(pipeline.vae.config.gene_names))


def test_pipelines_generate_and_edit_in_bf16(pipeline, tiny_adata):
    pipeline = pipeline.to(torch.bfloat16)
    assert pipeline.vae.dtype == pipeline.transformer.dtype == torch.bfloat16
    generated = pipeline(conditions={"cell_type": ["T", "B"]}, num_inference_steps=3,
                         generator=torch.Generator().manual_seed(0)).cells
    assert generated.shape[0] == 2 and np.isfinite(generated.X.toarray()).all() and generated.X.sum() >= 0

    editor = SCLDMCounterfactualPipeline(**pipeline.components)
    editor.set_progress_bar_config(disable=True)
    edited = editor(tiny_adata, target_conditions={"condition": "stim"}, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0)).cells
    assert edited.shape == (tiny_adata.n_obs, len(pipeline.vae.config.gene_names))
    assert (edited.obs["condition"] == "stim").all()


@pytest.fixture
def bf16_accelerator(tmp_path, monkeypatch):
    """`build_accelerator` of a CPU recipe with ``mixed_precision: bf16`` (Accelerate's per-process state is reset
    before and after, so the other tests keep training in float32), on a CPU taken to have bf16 matrix units so
    that the autocast path runs (emulated where the CPU lacks them)."""
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: True)
    AcceleratorState._reset_state()
    config = load_config(VAETrainingConfig, TINY, {"output_dir": str(tmp_path), "mixed_precision": "bf16",
                                                   "report_to": "none"}, section="vae")
    yield build_accelerator(config)
    AcceleratorState._reset_state()


def test_a_later_float32_stage_in_the_same_process_is_not_kept_in_bf16(bf16_accelerator, tmp_path):
    assert bf16_accelerator.mixed_precision == "bf16"
    for requested in ("no", None):  # explicit float32, and the launcher's default (no `accelerate launch`: "no")
        config = load_config(VAETrainingConfig, TINY, {"output_dir": str(tmp_path), "mixed_precision": requested,
                                                       "report_to": "none"}, section="vae")
        assert build_accelerator(config).mixed_precision == "no"


def test_bf16_on_a_cpu_without_bf16_units_trains_in_float32_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: False)
    AcceleratorState._reset_state()
    config = load_config(VAETrainingConfig, TINY, {"output_dir": str(tmp_path), "mixed_precision": "bf16",
                                                   "report_to": "none"}, section="vae")
    with caplog.at_level("WARNING"):
        accelerator = build_accelerator(config)
    assert accelerator.mixed_precision == "no" and config.mixed_precision == "no"  # what runs is what is recorded
    assert "without bf16 matrix units" in caplog.text
    AcceleratorState._reset_state()


def test_bf16_autocast_training_keeps_float32_weights_and_likelihood(batch, bf16_accelerator):
    cells, info = batch
    torch.manual_seed(0)
    vae = SCVAEModel(SCVAEConfig(gene_names=info.genes, hidden_size=16, num_latent_tokens=4, latent_dim=4,
                                 encoder_layers=1, decoder_layers=1, num_attention_heads=2, kl_weight=1e-3))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    model, optimizer = bf16_accelerator.prepare(vae, optimizer)
    readout_dtypes = []
    vae.decoder.output_head.register_forward_hook(lambda module, inputs, output: readout_dtypes.append(output.dtype))
    assert bf16_accelerator.mixed_precision == "bf16" and bf16_accelerator.device.type == "cpu"
    losses = []
    for _ in range(3):
        output = model(**cells)
        bf16_accelerator.backward(output.loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    assert readout_dtypes[0] == torch.bfloat16  # the matmuls ran under bf16 autocast
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in vae.parameters())  # float32 master weights
    assert output.reconstruction_loss.dtype == output.kl_loss.dtype == torch.float32
    # the likelihood inside autocast is the float32 one of the decoded parameters, not a bf16 approximation
    expected = -negative_binomial_log_prob(cells["panel_counts"], output.mean.detach(),
                                           output.inverse_dispersion.detach()).sum(dim=-1).mean()
    torch.testing.assert_close(output.reconstruction_loss.detach(), expected, rtol=1e-6, atol=0)
