"""scverse and diffusers conventions: `layer=` where AnnData enters, training on an in-memory AnnData, provenance in
generated `uns`, scvi-style `get_latent_representation` / `get_normalized_expression`, and the pipeline's `latents=`
and `callback_on_step_end`. Tiny untrained models on 60 real PBMC cells."""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

import scldm_hf
from scldm_hf.data import anndata_to_dataset, encode_dataset, load_corpus
from scldm_hf.errors import ConfigurationError, InputDataError
from scldm_hf.evaluation import evaluate_generation
from scldm_hf.evaluation.evaluate import Sample
from scldm_hf.models import SCVAEConfig, SCVAEModel
from scldm_hf.models.conditioning import CellConditioner
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines import SCLDMCounterfactualPipeline, SCLDMPipeline, generate_to_file
from scldm_hf.pipelines.scheduling_flow_match_ode import FlowMatchODESolverScheduler
from scldm_hf.training import VAETrainingConfig, load_config
from scldm_hf.training.vae import train_vae

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
NUM_CELLS = 60

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def layered(pbmc_counts) -> ad.AnnData:
    """The usual scverse object: log-normalised `X`, raw counts in `layers["counts"]`."""
    adata = pbmc_counts[:NUM_CELLS].copy()
    adata.layers["counts"] = adata.X.copy()
    threads = torch.get_num_threads()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    torch.set_num_threads(threads)  # scanpy resets torch's OpenMP thread count
    return adata


@pytest.fixture(scope="module")
def pipe(pbmc_counts) -> SCLDMPipeline:
    torch.manual_seed(0)
    dataset, info = anndata_to_dataset(pbmc_counts[:NUM_CELLS].copy(), covariates=["cell_type"])
    vae = SCVAEModel(SCVAEConfig(
        gene_names=info.genes, hidden_size=16, num_latent_tokens=4, latent_dim=8, encoder_layers=1, decoder_layers=1,
        encoder_cross_attention_heads=2, decoder_cross_attention_heads=2, num_attention_heads=2,
    )).eval()
    conditioner = CellConditioner.from_dataset(dataset)
    transformer = LatentDiTTransformer(
        num_latent_tokens=4, latent_dim=8, hidden_size=16, num_layers=1, num_attention_heads=2,
        timestep_embedding_dim=16, covariate_num_labels=conditioner.num_labels,
    ).eval()
    pipeline = SCLDMPipeline(vae, transformer, FlowMatchEulerDiscreteScheduler(), conditioner)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_latent_representation_reads_the_counts_layer(pipe, layered, pbmc_counts):
    latents = pipe.vae.get_latent_representation(layered, layer="counts", batch_size=16)
    expected = encode_dataset(pipe.vae, pbmc_counts[:NUM_CELLS].copy(), show_progress=False)
    assert latents.shape == (NUM_CELLS, 4 * 8)
    np.testing.assert_allclose(latents, expected.reshape(NUM_CELLS, -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pipe.vae.get_latent_representation(layered, layer="counts", indices=[3, 7]),
                               latents[[3, 7]], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputDataError):  # X holds log-normalised values, not counts
        pipe.vae.get_latent_representation(layered)


def test_saved_vae_code_does_not_ship_the_anndata_plumbing(pipe, tmp_path):
    pipe.vae.save_pretrained(tmp_path)
    shipped = {path.name for path in tmp_path.glob("*.py")}
    assert "modeling_scvae.py" in shipped and not shipped & {"encoding.py", "corpus.py", "collator.py"}


def test_normalized_expression_is_the_decoded_mean_at_the_requested_depth(pipe, layered):
    genes = list(pipe.vae.config.gene_names)
    frequencies = pipe.vae.get_normalized_expression(layered, layer="counts")
    assert list(frequencies.index) == list(layered.obs_names) and list(frequencies.columns) == genes
    np.testing.assert_allclose(frequencies.sum(axis=1), 1.0, rtol=1e-5)
    subset = pipe.vae.get_normalized_expression(layered, layer="counts", gene_list=genes[5:1:-1], library_size=1e4)
    np.testing.assert_allclose(subset.to_numpy(), 1e4 * frequencies[genes[5:1:-1]].to_numpy(), rtol=1e-4)
    observed = pipe.vae.get_normalized_expression(layered, layer="counts", library_size="latent")
    np.testing.assert_allclose(observed.sum(axis=1), np.asarray(layered.layers["counts"].sum(axis=1)).ravel(),
                               rtol=1e-4)


def test_counterfactual_pipeline_reads_the_counts_layer(pipe, layered, pbmc_counts):
    edit = SCLDMCounterfactualPipeline(**pipe.components)
    edit.set_progress_bar_config(disable=True)
    kwargs = {"target_conditions": {"cell_type": "CD19+ B"}, "num_inference_steps": 2, "output_type": "latent"}
    from_layer = edit(layered, layer="counts", **kwargs).cells
    torch.testing.assert_close(from_layer, edit(pbmc_counts[:NUM_CELLS].copy(), **kwargs).cells)
    cells = edit(layered[:4], layer="counts", target_conditions={"cell_type": "CD19+ B"}, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(5)).cells
    assert cells.uns["scldm_hf"]["edit_method"] == "inversion" and cells.uns["scldm_hf"]["layer"] == "counts"
    assert cells.uns["scldm_hf"]["seed"] == 5


def test_generated_cells_record_model_revision_seed_and_settings(pipe, tmp_path):
    """A pipeline loaded from a Hub cache snapshot names the repo and the commit; the h5ad written in batches and
    the in-memory AnnData carry the same record."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--lab--tiny-scldm" / "snapshots" / commit
    pipe.save_pretrained(snapshot)
    loaded = SCLDMPipeline.from_pretrained(snapshot)
    loaded.set_progress_bar_config(disable=True)
    settings = {"conditions": {"cell_type": "CD19+ B"}, "num_cells": 3, "guidance_scale": {"cell_type": 2.0},
                "num_inference_steps": 2}
    cells = loaded(generator=torch.Generator().manual_seed(7), **settings).cells
    expected = {
        "pipeline": "SCLDMPipeline", "model": "lab/tiny-scldm", "revision": commit, "seed": 7,
        "guidance_scale": {"cell_type": 2.0}, "num_inference_steps": 2, "scheduler": "FlowMatchEulerDiscreteScheduler",
        "scldm_hf_version": scldm_hf.__version__,
    }
    assert {name: cells.uns["scldm_hf"][name] for name in expected} == expected
    generate_to_file(loaded, tmp_path / "cells.h5ad", generator=torch.Generator().manual_seed(7), **settings)
    written = ad.read_h5ad(tmp_path / "cells.h5ad").uns["scldm_hf"]
    assert {name: written[name] for name in expected} == {**expected, "guidance_scale": {"cell_type": 2.0}}
    generate_to_file(loaded, tmp_path / "corpus", **settings)
    assert '"model": "lab/tiny-scldm"' in load_corpus(tmp_path / "corpus")[1].source
    assert "revision" not in pipe(num_cells=1, num_inference_steps=1).cells.uns["scldm_hf"]  # built in memory


def test_given_latents_are_the_initial_noise_of_one_loop(pipe):
    noise = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1))
    kwargs = {"conditions": {"cell_type": "CD56+ NK"}, "num_cells": 5, "num_inference_steps": 3}
    called = pipe(latents=noise, output_type="latent", batch_size=2, **kwargs).cells
    assert torch.equal(called, pipe(latents=noise, output_type="latent", generator=torch.Generator(), **kwargs).cells)
    batches = list(pipe.generate_batches(latents=noise, output_type="latent", batch_size=2, **kwargs))
    assert [len(batch.cell_ids) for batch in batches] == [2, 2, 1] and all(batch.counts is None for batch in batches)
    assert torch.equal(torch.cat([batch.latents for batch in batches]), called)
    seeded = pipe(generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs).cells
    assert torch.equal(seeded, called)  # the generator's noise, drawn for all cells at once, is the same noise


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    latents = pipe(num_cells=3, num_inference_steps=3, batch_size=2, output_type="latent",
                   callback_on_step_end=callback).cells
    assert seen == [(0, (2, 4, 8)), (1, (2, 4, 8)), (2, (2, 4, 8)), (0, (1, 4, 8)), (1, (1, 4, 8)), (2, (1, 4, 8))]
    torch.testing.assert_close(latents, pipe.vae.denormalize_latents(torch.zeros(3, 4, 8)))
    with pytest.raises(ConfigurationError, match=r"callback_on_step_end_tensor_inputs \['noise'\]"):
        pipe(num_cells=1, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])
    adaptive = SCLDMPipeline(**{**pipe.components, "scheduler": FlowMatchODESolverScheduler()})
    with pytest.raises(ConfigurationError, match="needs a stepping scheduler"):
        adaptive(num_cells=1, callback_on_step_end=callback)


class ZeroLatentsAtCutoff(PipelineCallback):
    """A diffusers callback object: zero the latents at step `int(num_timesteps * cutoff_step_ratio)`."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs


class RecordSteps(PipelineCallback):
    tensor_inputs = ["latents"]

    def __init__(self):
        super().__init__()
        self.steps = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.steps.append(step_index)
        return callback_kwargs


def test_diffusers_callback_objects_are_accepted(pipe):
    recorder = RecordSteps()
    callbacks = MultiPipelineCallbacks([recorder, ZeroLatentsAtCutoff(cutoff_step_ratio=0.75)])
    # a callback object's own tensor_inputs are used, as in diffusers' pipelines (the list given here is ignored)
    latents = pipe(num_cells=2, num_inference_steps=4, output_type="latent", callback_on_step_end=callbacks,
                   callback_on_step_end_tensor_inputs=["noise"]).cells
    assert recorder.steps == [0, 1, 2, 3]
    torch.testing.assert_close(latents, pipe.vae.denormalize_latents(torch.zeros(2, 4, 8)))

    class AsksForNoise(RecordSteps):
        tensor_inputs = ["noise"]

    with pytest.raises(ConfigurationError, match=r"callback_on_step_end_tensor_inputs \['noise'\]"):
        pipe(num_cells=1, callback_on_step_end=AsksForNoise())


def test_vae_trains_on_an_in_memory_anndata_layer(layered, tmp_path):
    config = load_config(VAETrainingConfig, TINY, {
        "data": "in-memory PBMC", "output_dir": str(tmp_path / "vae"), "layer": "counts", "max_train_steps": 2,
        "checkpointing_steps": 2, "validation_fraction": 0.0,
    }, section="vae")
    vae = train_vae(config, adata=layered)
    dataset, info = load_corpus(tmp_path / "vae" / "corpus")
    assert info.num_cells == NUM_CELLS and list(vae.config.gene_names) == info.genes
    first = dataset[0]
    counts = layered.layers["counts"][0].toarray().ravel()
    assert sum(first["counts"]) == counts.sum() == first["library_size"]


def test_evaluation_reads_the_counts_layer_of_the_real_cells(pbmc_counts, layered):
    """`evaluate_generation(..., layer=)` builds its samples from the layer (the full protocol is ~50 CPU-s, so the
    samples it scores are compared, and a missing layer fails before any work)."""
    from_layer = Sample.of(layered, "real", "cell_type", "cell_type", layer="counts")
    from_x = Sample.of(pbmc_counts[:NUM_CELLS], "real", "cell_type", "cell_type")
    assert (from_layer.log != from_x.log).nnz == 0 and (from_layer.labels == from_x.labels).all()
    with pytest.raises(InputDataError, match=r"real has no layer 'raw' \(layers: counts\)"):
        evaluate_generation(layered, pbmc_counts[:NUM_CELLS], "cell_type", reference=layered, layer="raw")
