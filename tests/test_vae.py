"""SCVAEModel: permutation invariance, padding, any-gene decoding, save/load, Auto classes, NB likelihood,
input validation, and a short training run on real PBMC counts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModel

from scldm_hf.data import CellCollator, GeneVocab, anndata_to_dataset, encode_dataset
from scldm_hf.errors import ConfigurationError, InputDataError, VocabularyError
from scldm_hf.models import SCVAEConfig, SCVAEModel, negative_binomial_log_prob, sample_negative_binomial

NUM_GENES = 30


def tiny_config(**overrides) -> SCVAEConfig:
    settings = {
        "gene_names": [f"gene{i}" for i in range(NUM_GENES)],
        "hidden_size": 16,
        "num_latent_tokens": 4,
        "latent_dim": 4,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_cross_attention_heads": 2,
        "decoder_cross_attention_heads": 2,
        "num_attention_heads": 4,
    }
    return SCVAEConfig(**{**settings, **overrides})


def tiny_model(**overrides) -> SCVAEModel:
    torch.manual_seed(0)
    return SCVAEModel(tiny_config(**overrides)).eval()


def token_batch(num_cells: int = 3, max_tokens: int = 8, seed: int = 0) -> dict:
    """Cells with 3..max_tokens distinct expressed genes, right-padded with id 0 / count 0."""
    generator = torch.Generator().manual_seed(seed)
    gene_ids = torch.zeros(num_cells, max_tokens, dtype=torch.long)
    counts = torch.zeros(num_cells, max_tokens)
    for cell in range(num_cells):
        length = int(torch.randint(3, max_tokens + 1, (1,), generator=generator))
        gene_ids[cell, :length] = torch.randperm(NUM_GENES, generator=generator)[:length] + 1
        counts[cell, :length] = torch.randint(1, 50, (length,), generator=generator).float()
    return {"gene_ids": gene_ids, "counts": counts, "attention_mask": gene_ids != 0}


@pytest.fixture(scope="module")
def model() -> SCVAEModel:
    return tiny_model()


@torch.no_grad()
def test_latents_are_invariant_to_gene_token_order(model):
    batch = token_batch()
    shuffled = {}
    order = torch.stack([torch.randperm(batch["gene_ids"].shape[1]) for _ in range(len(batch["gene_ids"]))])
    for name, tensor in batch.items():
        shuffled[name] = torch.gather(tensor, 1, order)
    expected = model.encode(**batch).latents
    assert expected.shape == (3, 4, 4)
    torch.testing.assert_close(model.encode(**shuffled).latents, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_padding_has_no_influence(model):
    batch = token_batch()
    expected = model.encode(**batch).latents
    extra = 5
    padded = {
        "gene_ids": torch.cat([batch["gene_ids"], torch.zeros(3, extra, dtype=torch.long)], dim=1),
        "counts": torch.cat([batch["counts"], torch.zeros(3, extra)], dim=1),
    }
    padded["attention_mask"] = padded["gene_ids"] != 0
    torch.testing.assert_close(model.encode(**padded).latents, expected, atol=1e-5, rtol=0)

    # masked positions are ignored whatever they hold
    garbage = {name: tensor.clone() for name, tensor in padded.items()}
    masked = ~garbage["attention_mask"]
    garbage["gene_ids"][masked] = 7
    garbage["counts"][masked] = 1000.0
    library_size = batch["counts"].sum(dim=-1)
    torch.testing.assert_close(
        model.encode(**garbage, library_size=library_size).latents, expected, atol=1e-5, rtol=0
    )


@torch.no_grad()
def test_decoding_is_equivariant_to_requested_gene_order(model):
    latents = model.encode(**token_batch()).latents
    library_size = torch.tensor([100.0, 250.0, 40.0])
    genes = torch.tensor([3, 17, 1, 30, 8, 12])
    permutation = torch.randperm(len(genes), generator=torch.Generator().manual_seed(1))
    decoded = model.decode(latents, genes, library_size)
    decoded_permuted = model.decode(latents, genes[permutation], library_size)
    torch.testing.assert_close(decoded_permuted.mean, decoded.mean[:, permutation], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded_permuted.inverse_dispersion, decoded.inverse_dispersion[permutation])
    torch.testing.assert_close(decoded.mean.sum(dim=-1), library_size)

    # a different gene order per cell ([B, G]) gives the same per-gene values
    per_cell = torch.stack([genes, genes[permutation], genes.flip(0)])
    decoded_per_cell = model.decode(latents, per_cell, library_size)
    torch.testing.assert_close(decoded_per_cell.mean[1], decoded.mean[1, permutation], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded_per_cell.mean[2], decoded.mean[2].flip(0), atol=1e-5, rtol=1e-5)
    assert decoded_per_cell.inverse_dispersion.shape == (3, len(genes))

    everything = model.decode(latents, library_size=library_size)
    assert everything.mean.shape == (3, NUM_GENES)


def test_save_and_reload_gives_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["gene_names"] == model.config.gene_names

    reloaded = SCVAEModel.from_pretrained(tmp_path)
    assert reloaded is not model and not reloaded.training
    assert reloaded.gene_vocab == GeneVocab(model.config.gene_names)
    batch = token_batch(seed=3)
    with torch.no_grad():
        expected = model(**batch, library_size=batch["counts"].sum(-1), panel_counts=torch.ones(3, NUM_GENES))
        actual = reloaded(**batch, library_size=batch["counts"].sum(-1), panel_counts=torch.ones(3, NUM_GENES))
    torch.testing.assert_close(actual.latents, expected.latents, atol=0, rtol=0)
    torch.testing.assert_close(actual.mean, expected.mean, atol=0, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=0, rtol=0)

    auto_loaded = AutoModel.from_pretrained(tmp_path)
    assert type(auto_loaded) is SCVAEModel
    torch.testing.assert_close(auto_loaded.encode(**batch).latents, expected.latents, atol=0, rtol=0)


def test_automodel_trust_remote_code_loads_saved_code(model, tmp_path):
    """A fresh interpreter that never imports scldm_hf.models loads the checkpoint through its saved code."""
    model.save_pretrained(tmp_path / "checkpoint")
    assert {"modeling_scvae.py", "configuration_scvae.py", "layers.py"} <= set(os.listdir(tmp_path / "checkpoint"))
    batch = token_batch(seed=4)
    torch.save(batch, tmp_path / "batch.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(tmp_path / 'checkpoint')!r}, trust_remote_code=True)\n"
        "assert 'scldm_hf.models' not in sys.modules, 'the local model code was imported'\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model.encode(**batch).latents, {str(tmp_path / 'latents.pt')!r})\n"
        "print(type(model).__module__)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("transformers_modules.")
    with torch.no_grad():
        expected = model.encode(**batch).latents
    torch.testing.assert_close(torch.load(tmp_path / "latents.pt"), expected, atol=0, rtol=0)


def test_negative_binomial_log_prob_matches_torch_distribution():
    counts = torch.tensor([[0.0, 1.0, 5.0, 40.0], [3.0, 0.0, 12.0, 250.0]])
    mean = torch.tensor([[0.3, 2.0, 4.5, 30.0], [0.01, 7.0, 12.0, 180.0]])
    theta = torch.tensor([0.2, 1.5, 10.0, 3.0])
    reference = torch.distributions.NegativeBinomial(total_count=theta, probs=mean / (mean + theta)).log_prob(counts)
    torch.testing.assert_close(negative_binomial_log_prob(counts, mean, theta), reference, atol=1e-4, rtol=1e-5)


def test_negative_binomial_sampling_is_seeded_and_has_nb_moments():
    mean = torch.full((20_000, 2), 6.0)
    theta = torch.tensor([0.5, 50.0])
    first = sample_negative_binomial(mean, theta, generator=torch.Generator().manual_seed(0))
    again = sample_negative_binomial(mean, theta, generator=torch.Generator().manual_seed(0))
    assert first.dtype == torch.long and torch.equal(first, again)
    torch.testing.assert_close(first.float().mean(0), mean[0], rtol=0.05, atol=0)
    torch.testing.assert_close(first.float().var(0), mean[0] + mean[0] ** 2 / theta, rtol=0.1, atol=0)
    poisson = sample_negative_binomial(mean, None, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(poisson.float().var(0), mean[0], rtol=0.1, atol=0)


def test_forward_loss_is_nb_nll_summed_over_genes_mean_over_cells(model):
    batch = token_batch(seed=5)
    panel_counts = torch.randint(0, 6, (3, NUM_GENES)).float()
    library_size = panel_counts.sum(dim=-1) + 1
    with torch.no_grad():
        output = model(**batch, library_size=library_size, panel_counts=panel_counts)
    expected = -negative_binomial_log_prob(panel_counts, output.mean, output.inverse_dispersion).sum(-1).mean()
    torch.testing.assert_close(output.loss, expected)
    assert output.kl_loss is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"value_encoding": "concat", "count_transform": "log1p"},
        {"dispersion": "gene-cell"},
        {"likelihood": "gaussian"},
        {"kl_weight": 0.1},
        {"value_encoding": "soft_bins", "count_transform": "none", "encode_all_genes": True},
    ],
    ids=["concat-log1p", "gene-cell-dispersion", "gaussian-likelihood", "gaussian-posterior", "soft-bins-all-genes"],
)
def test_variants_train_end_to_end(overrides):
    model = tiny_model(**overrides).train()
    batch = token_batch(seed=6)
    panel_counts = torch.randint(0, 6, (3, NUM_GENES)).float()
    output = model(**batch, library_size=panel_counts.sum(-1) + 1, panel_counts=panel_counts)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.gene_embedding.weight.grad.abs().sum() > 0
    assert output.mean.shape == (3, NUM_GENES) and (output.mean >= 0).all()


@torch.no_grad()
def test_encode_all_genes_reads_unexpressed_genes_as_zero_counts():
    model = tiny_model(value_encoding="soft_bins", count_transform="none", encode_all_genes=True)
    batch = token_batch(seed=8)
    dense = torch.zeros(3, NUM_GENES + 1).scatter_(1, batch["gene_ids"], batch["counts"])[:, 1:]
    all_genes = torch.arange(1, NUM_GENES + 1).expand(3, -1)
    sparse_latents = model.encode(**batch).latents
    dense_latents = model.encode(all_genes, dense, torch.ones_like(all_genes, dtype=torch.bool)).latents
    torch.testing.assert_close(sparse_latents, dense_latents)
    model.config.encode_all_genes = False  # the expressed genes alone: zero-count soft-bin tokens are not zero
    assert (model.encode(**batch).latents - dense_latents).abs().max() > 1e-3


def test_gaussian_posterior_samples_in_training_and_uses_mean_in_eval():
    model = tiny_model(kl_weight=0.5)
    batch = token_batch(seed=7)
    panel_counts = torch.randint(0, 6, (3, NUM_GENES)).float()
    with torch.no_grad():
        encoded = model.encode(**batch)
        torch.testing.assert_close(encoded.latents, encoded.posterior_mean)
        sample = model.encode(**batch, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        same_sample = model.encode(**batch, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        output = model(**batch, library_size=panel_counts.sum(-1) + 1, panel_counts=panel_counts)
    assert not torch.allclose(sample.latents, encoded.posterior_mean)
    torch.testing.assert_close(sample.latents, same_sample.latents)
    assert output.kl_loss > 0
    torch.testing.assert_close(output.loss, output.reconstruction_loss + 0.5 * output.kl_loss)


def test_thinning_thins_input_and_target_alike_and_only_in_training():
    model = tiny_model(thinning_min_fraction=0.3)
    batch = token_batch(seed=8)
    panel_counts = torch.zeros(3, NUM_GENES)
    for cell in range(3):
        expressed = batch["attention_mask"][cell]
        panel_counts[cell, batch["gene_ids"][cell, expressed] - 1] = batch["counts"][cell, expressed]
    library_size = panel_counts.sum(-1) + 20  # 20 counts on genes outside the panel
    counts, attention_mask, thinned_library, thinned_panel = model.thin_cells(
        **batch, library_size=library_size, panel_counts=panel_counts, generator=torch.Generator().manual_seed(0)
    )
    assert (thinned_panel <= panel_counts).all() and thinned_panel.sum() < panel_counts.sum()
    assert thinned_library.sum() < library_size.sum() and (thinned_library >= thinned_panel.sum(-1)).all()
    for cell in range(3):
        tokens = batch["gene_ids"][cell, batch["attention_mask"][cell]]
        torch.testing.assert_close(counts[cell, batch["attention_mask"][cell]], thinned_panel[cell, tokens - 1])
    assert torch.equal(attention_mask, batch["attention_mask"] & (counts > 0))
    with torch.no_grad():
        evaluated = model(**batch, library_size=library_size, panel_counts=panel_counts)
        trained = model.train()(**batch, library_size=library_size, panel_counts=panel_counts)
    expected = -negative_binomial_log_prob(panel_counts, evaluated.mean, evaluated.inverse_dispersion).sum(-1).mean()
    torch.testing.assert_close(evaluated.loss, expected)
    assert not torch.isclose(trained.loss, evaluated.loss)
    with pytest.raises(ConfigurationError, match="thinning_min_fraction"):
        tiny_config(thinning_min_fraction=0.0)
    per_cell_panels = torch.arange(1, NUM_GENES + 1).expand(3, NUM_GENES)
    with pytest.raises(ConfigurationError, match="one gene panel"):
        model.thin_cells(**batch, library_size=library_size, panel_counts=panel_counts, panel_gene_ids=per_cell_panels)


def test_invalid_inputs_raise_clear_errors(model):
    batch = token_batch()
    cases = [
        ({"gene_ids": batch["gene_ids"].masked_fill(batch["gene_ids"] == batch["gene_ids"][0, 0], 99)},
         VocabularyError),
        ({"counts": batch["counts"].masked_fill(batch["counts"] > 0, -1.0)}, InputDataError),
        ({"counts": batch["counts"].masked_fill(batch["counts"] > 0, float("nan"))}, InputDataError),
        ({"counts": batch["counts"][:, :-1]}, InputDataError),
        ({"attention_mask": torch.zeros_like(batch["attention_mask"])}, InputDataError),
        ({"attention_mask": torch.ones_like(batch["attention_mask"])}, InputDataError),
    ]
    for change, error in cases:
        with pytest.raises(error):
            model.encode(**{**batch, **change})
    latents = model.encode(**batch).latents
    with pytest.raises(VocabularyError, match="1..30"):
        model.decode(latents, torch.tensor([0, 3]), torch.ones(3))
    with pytest.raises(InputDataError, match="library_size"):
        model.decode(latents, torch.tensor([1, 3]), torch.ones(2))
    with pytest.raises(ConfigurationError, match="library_size is required"):
        model.decode(latents, torch.tensor([1, 3]))
    with pytest.raises(InputDataError, match="panel_counts"):
        model(**batch, library_size=torch.ones(3), panel_counts=torch.ones(3, 5))
    with pytest.raises(ConfigurationError, match="num_attention_heads"):
        tiny_config(num_attention_heads=3)
    with pytest.raises(ConfigurationError, match="gene_names"):
        SCVAEModel(tiny_config(gene_names=None))


def test_encode_dataset_matches_encode_on_real_cells(model, pbmc_counts):
    vocab = GeneVocab(pbmc_counts.var_names[:NUM_GENES])
    pbmc_model = tiny_model(gene_names=vocab.genes)
    cells = pbmc_counts[:40, :NUM_GENES].copy()
    cells = cells[np.asarray(cells.X.sum(axis=1)).ravel() > 0].copy()
    latents = encode_dataset(pbmc_model, cells, batch_size=16, show_progress=False)
    assert latents.shape == (cells.n_obs, 4, 4) and latents.dtype == np.float32

    dataset, info = anndata_to_dataset(cells, vocab=vocab)
    batch = CellCollator.from_corpus_info(info)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        expected = pbmc_model.encode(
            batch["gene_ids"], batch["counts"], batch["attention_mask"], library_size=batch["library_size"]
        ).latents
    np.testing.assert_allclose(latents, expected.numpy(), atol=1e-5)


def fit_mean_proportion_baseline(panel_counts: torch.Tensor, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-gene expression proportions `[G]` and maximum-likelihood NB inverse dispersions `[G]` of training counts."""
    proportions = panel_counts.sum(dim=0) / panel_counts.sum()
    mean = proportions * panel_counts.sum(dim=-1, keepdim=True)
    log_theta = torch.zeros_like(proportions, requires_grad=True)
    optimizer = torch.optim.Adam([log_theta], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        (-negative_binomial_log_prob(panel_counts, mean, log_theta.exp()).sum(-1).mean()).backward()
        optimizer.step()
    return proportions, log_theta.detach().exp()


@pytest.mark.slow
def test_training_beats_gene_mean_baseline_on_held_out_pbmc_cells(pbmc_counts, one_torch_thread):
    """300 steps of a tiny VAE on real counts (256 most expressed genes) lower the held-out NB NLL well below an NB
    that predicts every cell's genes from the training mean proportions (MLE dispersion)."""
    torch.manual_seed(0)
    top_genes = np.sort(np.argsort(-np.asarray(pbmc_counts.X.sum(axis=0)).ravel())[:256])
    cells = pbmc_counts[:, top_genes].copy()
    cells = cells[np.asarray(cells.X.sum(axis=1)).ravel() > 0].copy()
    order = np.random.default_rng(0).permutation(cells.n_obs)
    train_set, info = anndata_to_dataset(cells[np.sort(order[:560])].copy())
    test_set, _ = anndata_to_dataset(cells[np.sort(order[560:])].copy(), vocab=info.vocab)
    collator = CellCollator.from_corpus_info(info)

    model = SCVAEModel(tiny_config(gene_names=info.genes)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(train_set, batch_size=32, shuffle=True, collate_fn=collator, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    step = 0
    while step < 300:
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == 300:
                break

    train_batch = collator([train_set[i] for i in range(len(train_set))])
    test_batch = collator([test_set[i] for i in range(len(test_set))])
    proportions, theta = fit_mean_proportion_baseline(train_batch["panel_counts"])
    baseline_mean = proportions * test_batch["library_size"][:, None]
    baseline_nll = -negative_binomial_log_prob(test_batch["panel_counts"], baseline_mean, theta).sum(-1).mean()
    with torch.no_grad():
        model_nll = model.eval()(**test_batch).reconstruction_loss
    assert model_nll < baseline_nll - 15, (float(model_nll), float(baseline_nll))


def test_chunked_readout_matches_unchunked_outputs_and_gradients():
    """The decoder read-out in 7-gene chunks (checkpointed) gives the outputs and gradients of one 300-gene chunk."""
    genes = [f"g{i}" for i in range(300)]
    generator = torch.Generator().manual_seed(1)
    gene_ids = torch.randint(1, 301, (5, 20), generator=generator)
    counts = torch.randint(0, 5, (5, 20), generator=generator).float()
    panel_counts = torch.randint(0, 4, (5, 300), generator=generator).float()

    def run(chunk_size):
        torch.manual_seed(0)
        config = SCVAEConfig(gene_names=genes, hidden_size=32, num_latent_tokens=8, latent_dim=8,
                             dispersion="gene-cell", readout_chunk_size=chunk_size)
        model = SCVAEModel(config)
        output = model(gene_ids, counts, torch.ones(5, 20, dtype=torch.bool), library_size=panel_counts.sum(-1) + 10,
                       panel_counts=panel_counts)
        output.loss.backward()
        return output.mean, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    mean, grads = run(7)
    reference_mean, reference_grads = run(300)
    torch.testing.assert_close(mean, reference_mean, rtol=0, atol=1e-6)
    for name, grad in reference_grads.items():
        scale = grad.abs().max()
        torch.testing.assert_close(grads[name] / scale, grad / scale, rtol=0, atol=1e-5, msg=name)


def test_token_checks_run_in_eval_mode_only(model, monkeypatch):
    """Per-batch validation (host syncs) stays out of the training step: corpora are validated at conversion."""
    import scldm_hf.models.modeling_scvae as modeling

    checked = []
    monkeypatch.setattr(modeling, "check_gene_tokens", lambda *args, **kwargs: checked.append(model.training))
    batch = token_batch()
    model.encode(**batch)
    model.train()
    try:
        model.encode(**batch)
    finally:
        model.eval()
    assert checked == [False]


def test_decoder_latent_noise_reaches_only_the_training_decoder_and_scales_with_the_batch_spread():
    model = tiny_model(decoder_latent_noise=0.5)
    batch = token_batch(num_cells=4, seed=9)
    library_size = batch["counts"].sum(-1)
    panel_counts = torch.zeros(4, NUM_GENES)
    with torch.no_grad():
        latents = model.encode(**batch).latents
        evaluated = model(**batch, library_size=library_size, panel_counts=panel_counts)
        trained = model.train()(**batch, library_size=library_size, panel_counts=panel_counts,
                                generator=torch.Generator().manual_seed(0))
        noised = model.noised_latents(latents, generator=torch.Generator().manual_seed(0))
        decoded_noised = model.decode(noised, library_size=library_size)
        identical_cells = latents[:1].expand_as(latents)
        unnoised = model.noised_latents(identical_cells, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(trained.latents, latents)  # the encoded latents are returned un-noised
    torch.testing.assert_close(evaluated.mean, model.eval().decode(latents, library_size=library_size).mean)
    torch.testing.assert_close(trained.mean, decoded_noised.mean)  # the training decoder read the noised latents
    relative_noise = (noised - latents) / latents.std(dim=0, correction=0)
    assert 0.4 < relative_noise.std().item() < 0.6
    torch.testing.assert_close(unnoised, identical_cells)  # no spread over the batch, no noise
    with pytest.raises(ConfigurationError, match="decoder_latent_noise"):
        tiny_config(decoder_latent_noise=0.0)
