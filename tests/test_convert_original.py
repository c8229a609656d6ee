"""Parity of `scldm convert-original` with the authors' released scLDM code (../shared/reference), random weights.

The reference VAE and DiT are built from their Hydra model configs (`vae_base.yaml`, `ldm_base.yaml`) at small widths,
randomised, saved as the Lightning module would (`vae_model.*`, `diffusion_model.*`, `ema_model.ema_model.*`),
converted, and compared on cells with padding (the VAE in float64; the DiT in float32, as the reference's timestep embedding is).
"""

import pickle
from pathlib import Path

import pytest
import torch
import yaml

from scldm_hf.conversion.convert_original import convert_original_checkpoint, load_original_state_dict
from scldm_hf.errors import CheckpointError
from scldm_hf.pipelines import SCLDMPipeline

from reference_code import REFERENCE_DIR, build_reference, import_reference, save_lightning_checkpoint
from reference_code import pipeline_latents, reference_ode_sample

NUM_GENES = 30
CLASS_VOCAB_SIZES = {"cell_type": 3, "donor": 2}


@pytest.fixture(scope="module")
def reference():
    """The reference `scldm` modules."""
    return import_reference(
        "scldm", REFERENCE_DIR / "scldm" / "src",
        ["layers", "nnets", "stochastic_layers", "transport.integrators"],
    )


def _released_config(tmp_path: Path, decoder_name: str) -> Path:
    """Compose vae_base.yaml + ldm_base.yaml as Hydra would (small widths) into one released-style config file."""
    configs = REFERENCE_DIR / "scldm" / "experiments" / "configs" / "model"
    model = yaml.safe_load((configs / "vae_base.yaml").read_text())
    ldm = yaml.safe_load((configs / "ldm_base.yaml").read_text())
    model["module"] = {**model["module"], **{key: value for key, value in ldm["module"].items()}}
    model["module"]["vae_model"]["encoder"].update(n_layer=2)
    model["module"]["diffusion_model"].update(n_embed=32, n_layer=2, n_head=4)
    model["decoder_name"] = decoder_name
    released = {"model": model, "datamodule": {"vocabulary_encoder": {"n_genes": NUM_GENES,
                                                                      "class_vocab_sizes": CLASS_VOCAB_SIZES}}}
    path = tmp_path / "released.yaml"
    path.write_text(yaml.safe_dump(released))
    return path


def _padded_cells() -> dict[str, torch.Tensor]:
    """3 cells as gene tokens, the last two padded (id 0, count 0)."""
    gene_ids = torch.tensor([[3, 7, 1, 20, 29, 11], [5, 2, 9, 0, 0, 0], [30, 14, 0, 0, 0, 0]])
    counts = torch.tensor([[4.0, 1, 12, 2, 7, 1], [3, 40, 1, 0, 0, 0], [2, 9, 0, 0, 0, 0]], dtype=torch.float64)
    return {"gene_ids": gene_ids, "counts": counts, "attention_mask": gene_ids > 0}


@pytest.mark.parametrize("decoder_name", ["negative_binomial_shared_theta", "negative_binomial_unshared_theta"])
def test_converted_vae_and_dit_match_the_reference(reference, tmp_path, decoder_name):
    config = _released_config(tmp_path, decoder_name)
    input_layer, encoder, decoder, head, dit = build_reference(reference, config)
    checkpoint = tmp_path / "released.ckpt"
    save_lightning_checkpoint(checkpoint, input_layer, encoder, decoder, head, dit)
    pipe = SCLDMPipeline.from_pretrained(convert_original_checkpoint(checkpoint, config, tmp_path / "converted"))
    vae, transformer = pipe.vae.double(), pipe.transformer

    cells = _padded_cells()
    library_size = torch.tensor([200.0, 80.0, 1000.0], dtype=torch.float64)
    all_genes = torch.arange(1, NUM_GENES + 1)
    with torch.no_grad():
        reference_latents = encoder(input_layer(cells["counts"], cells["gene_ids"]))
        genes = all_genes.expand(3, -1)
        reference_mean, reference_theta = head(
            decoder(reference_latents, input_layer.gene_embedding(genes)), genes, library_size[:, None]
        )
        latents = vae.encode(**cells, library_size=library_size).latents
        decoded = vae.decode(reference_latents, gene_ids=all_genes, library_size=library_size)
    assert (latents - reference_latents).abs().max() <= 1e-5
    assert (decoded.mean - reference_mean).abs().max() <= 1e-5 * reference_mean.abs().max()
    assert (decoded.inverse_dispersion.expand_as(reference_theta) - reference_theta).abs().max() <= 1e-5

    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(3, 16, 16, generator=generator)
    data_time = torch.tensor([0.0, 0.37, 0.93])
    # "mutually_exclusive" conditioning uses one covariate per call (picked at random when several are given)
    for condition in ({"cell_type": torch.tensor([0, 2, 3])}, {"donor": torch.tensor([1, 2, 0])}):  # 3, 2: null ids
        with torch.no_grad():
            reference_velocity = dit(noisy, data_time, condition, force_drop_ids=False)
            velocity = transformer(noisy, (1 - data_time) * 1000, covariates=condition).sample
        assert (velocity + reference_velocity).abs().max() <= 1e-5  # ours is noise - data, the reference's data - noise


def test_dopri5_sample_matches_the_reference_integrator(reference, tmp_path):
    config = _released_config(tmp_path, "negative_binomial_shared_theta")
    input_layer, encoder, decoder, head, dit = build_reference(reference, config)
    online = build_reference(reference, config)[-1]
    checkpoint = tmp_path / "released.ckpt"
    save_lightning_checkpoint(checkpoint, input_layer, encoder, decoder, head, online, ema_dit=dit)
    pipe = SCLDMPipeline.from_pretrained(convert_original_checkpoint(checkpoint, config, tmp_path / "converted"))
    pipe.vae.double()
    assert "EMA DiT weights" in (tmp_path / "converted" / "README.md").read_text()

    num_cells, guidance = 4, {"cell_type": 2.0}
    labels = torch.tensor([0, 1, 2, 0])
    noise = torch.randn(num_cells, 16, 16, generator=torch.Generator().manual_seed(5))
    reference_sample = reference_ode_sample(
        reference, lambda x, t, **kwargs: dit.forward_with_cfg(x, t, **kwargs, cfg_scale=guidance),
        torch.cat([noise, noise]), {"cell_type": torch.cat([labels, labels])}, atol=1e-5, rtol=1e-5,
    )[num_cells:]
    sample = pipeline_latents(pipe, {"cell_type": labels}, guidance, seed=5)
    assert (sample - reference_sample).abs().max() <= 1e-4


def test_converter_refuses_code_and_bad_files(reference, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    malicious = tmp_path / "mu.pkl"
    malicious.write_bytes(pickle.dumps({"a": Payload()}))
    checkpoint = tmp_path / "released.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": Payload()}, checkpoint)
    with pytest.raises(CheckpointError, match="weights only"):
        load_original_state_dict(checkpoint)
    config = _released_config(tmp_path, "negative_binomial_shared_theta")
    torch.save({"state_dict": {"x": torch.zeros(1)}}, checkpoint)
    with pytest.raises(CheckpointError, match="no 'vae_model.input_layer' weights"):
        convert_original_checkpoint(checkpoint, config, tmp_path / "out", size_factors=(malicious, malicious))
    input_layer, encoder, decoder, head, dit = build_reference(reference, config)
    save_lightning_checkpoint(checkpoint, input_layer, encoder, decoder, head, dit)
    with pytest.raises(CheckpointError, match="not a plain-data pickle"):
        convert_original_checkpoint(checkpoint, config, tmp_path / "out", size_factors=(malicious, malicious))


def test_cli_converts_with_size_factors_and_names(reference, tmp_path, capsys):
    import anndata as ad
    import numpy as np
    import pandas as pd

    from scldm_hf.cli import main

    config = _released_config(tmp_path, "negative_binomial_shared_theta")
    checkpoint = tmp_path / "released.ckpt"
    save_lightning_checkpoint(checkpoint, *build_reference(reference, config))
    obs = pd.DataFrame({"cell_type": pd.Categorical(["B", "NK", "T"]), "donor": pd.Categorical(["d1", "d2", "d1"])})
    adata = ad.AnnData(np.zeros((3, NUM_GENES), dtype=np.float32), obs=obs)
    adata.var_names = [f"G{index}" for index in range(NUM_GENES)]
    adata.write_h5ad(tmp_path / "train.h5ad")
    (tmp_path / "mu.pkl").write_bytes(pickle.dumps({"cell_type": {"B": 7.0, "NK": 8.0, "T": 7.0}}))
    (tmp_path / "sd.pkl").write_bytes(pickle.dumps({"cell_type": {"B": 0.5, "NK": 0.5, "T": 0.5}}))

    argv = ["convert-original", str(checkpoint), "--config", str(config), "--anndata", str(tmp_path / "train.h5ad"),
            "--size-factors", str(tmp_path / "mu.pkl"), str(tmp_path / "sd.pkl"), "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    pipe = SCLDMPipeline.from_pretrained(tmp_path / "out")
    assert pipe.vae.config.gene_names[:2] == ["G0", "G1"]
    assert pipe.conditioner.config.covariate_labels == {"cell_type": ["B", "NK", "T"], "donor": ["d1", "d2"]}
    log_size = pipe.conditioner.sample_library_size({"cell_type": torch.tensor([1] * 200)}, 200).log()
    assert abs(log_size.mean() - 8.0) < 0.15 and abs(log_size.std() - 0.5) < 0.1
    assert type(pipe.scheduler).__name__ == "FlowMatchODESolverScheduler"

    capsys.readouterr()
    assert main(argv[:-1] + [str(tmp_path / "out2"), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: Config")
