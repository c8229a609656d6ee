"""Perturbation prediction on Kang et al. 2018 (IFN-beta stimulated PBMCs): unseen label combinations and
counterfactual editing with `SCLDMCounterfactualPipeline`.

One small scLDM is trained once (a few hundred steps on a few hundred highly variable genes) without the
(Dendritic, stimulated) cells, then asked to produce them; the interferon response is checked on CD14+ monocytes,
whose stimulated cells it has seen (benchmarks/bench_perturbation.py scores held-out cell types properly).
"""

from pathlib import Path

import numpy as np
import pytest
import scanpy as sc
import torch

from scldm_hf.data import encode_dataset
from scldm_hf.errors import ConfigurationError
from scldm_hf.evaluation import log_normalize
from scldm_hf.workflows.side_by_side import train_scldm
from scldm_hf.pipelines import SCLDMCounterfactualPipeline, SCLDMPipeline

KANG_PATH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kang2018_pbmc_ifnb_counts.h5ad"
RECIPE = Path(__file__).resolve().parents[1] / "training" / "configs" / "kang_perturbation.yaml"
HELD_OUT_TYPE = "Dendritic"
RESPONDING_TYPE = "CD14+Mono"
INTERFERON_GENES = ["ISG15", "IFI6", "IFIT1"]
NUM_GENES = 300
TRAIN_STEPS = 300
GUIDANCE = {"cell_type": 2.0, "condition": 2.0}

pytestmark = pytest.mark.skipif(not KANG_PATH.is_file(), reason=f"Kang 2018 counts not found at {KANG_PATH.resolve()}")


def interferon_score(cells) -> np.ndarray:
    """Mean log1p-CP10k expression of each interferon-stimulated gene `[3]`."""
    return np.asarray(log_normalize(cells.X)[:, cells.var_names.get_indexer(INTERFERON_GENES)].mean(axis=0)).ravel()


@pytest.fixture(scope="module")
def kang():
    cells = sc.read_h5ad(KANG_PATH)
    variable = sc.pp.highly_variable_genes(cells, n_top_genes=NUM_GENES, flavor="seurat_v3", inplace=False)
    cells = cells[:, variable["highly_variable"].to_numpy() | cells.var_names.isin(INTERFERON_GENES)].copy()
    cells = cells[np.asarray(cells.X.sum(axis=1)).ravel() > 0].copy()
    cells.obs = cells.obs[["cell_type", "condition"]]
    return cells


@pytest.fixture(scope="module")
def editor(kang, tmp_path_factory) -> SCLDMCounterfactualPipeline:
    held_out = (kang.obs["cell_type"] == HELD_OUT_TYPE) & (kang.obs["condition"] == "stimulated")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 shared cores: extra intra-op threads only spin
    try:
        pipeline_dir = train_scldm(
            kang[~held_out.to_numpy()].copy(),
            "cell_type",
            RECIPE,
            tmp_path_factory.mktemp("kang"),
            {"covariates": ["cell_type", "condition"], "max_train_steps": TRAIN_STEPS, "lr_warmup_steps": 20},
        )
    finally:
        torch.set_num_threads(threads)
    pipe = SCLDMCounterfactualPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(editor, cell_type: str, condition: str, num_cells: int = 40, seed: int = 0):
    generator = SCLDMPipeline(**editor.components)
    generator.set_progress_bar_config(disable=True)
    return generator(
        conditions={"cell_type": [cell_type] * num_cells, "condition": [condition] * num_cells},
        guidance_scale=GUIDANCE,
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(seed),
    ).cells


def test_interferon_genes_survive_gene_selection(kang):
    assert set(INTERFERON_GENES) <= set(kang.var_names)


def test_unseen_combination_is_generated_reproducibly(editor):
    first, again = generate(editor, HELD_OUT_TYPE, "stimulated"), generate(editor, HELD_OUT_TYPE, "stimulated")
    other_seed = generate(editor, HELD_OUT_TYPE, "stimulated", seed=1)
    assert first.shape == (40, editor.vae.config.vocab_size)
    assert set(first.obs["condition"]) == {"stimulated"} and set(first.obs["cell_type"]) == {HELD_OUT_TYPE}
    assert (first.X != again.X).nnz == 0
    assert (first.X != other_seed.X).nnz > 0


def test_stimulated_monocytes_express_interferon_genes(editor):
    stimulated, control = generate(editor, RESPONDING_TYPE, "stimulated"), generate(editor, RESPONDING_TYPE, "control")
    assert np.all(interferon_score(stimulated) > interferon_score(control))


def responding_controls(kang, num_cells: int = 50):
    is_control = (kang.obs["cell_type"] == RESPONDING_TYPE) & (kang.obs["condition"] == "control")
    return kang[is_control.to_numpy()][:num_cells].copy()


@pytest.mark.parametrize("edit_method", ["inversion", "difference", "flowedit"])
def test_counterfactual_is_paired_with_its_input(editor, kang, edit_method):
    controls = responding_controls(kang)
    controls.obs["donor_note"] = [f"cell {index}" for index in range(controls.n_obs)]
    edited = editor(
        controls, {"condition": "stimulated"}, guidance_scale=GUIDANCE, edit_method=edit_method,
        num_inference_steps=10, generator=torch.Generator().manual_seed(0),
    ).cells

    assert list(edited.obs_names) == list(controls.obs_names)
    assert list(edited.obs["donor_note"]) == list(controls.obs["donor_note"])
    assert set(edited.obs["condition"]) == {"stimulated"} and set(edited.obs["source_condition"]) == {"control"}
    assert list(edited.obs["cell_type"]) == list(controls.obs["cell_type"])
    # every edited cell keeps its input's sequencing depth (up to the negative binomial draw)
    depth_ratio = np.asarray(edited.X.sum(axis=1)).ravel() / np.asarray(controls.X.sum(axis=1)).ravel()
    assert 0.7 < np.median(depth_ratio) < 1.3
    assert np.all(interferon_score(edited) > interferon_score(controls))


@pytest.mark.parametrize("edit_method", ["difference", "flowedit"])
def test_unchanged_labels_return_the_cells_own_latents(editor, kang, edit_method):
    controls = responding_controls(kang, num_cells=20)
    edited = editor(controls, edit_method=edit_method, num_inference_steps=5, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).cells
    own = torch.from_numpy(encode_dataset(editor.vae, controls))
    torch.testing.assert_close(edited, own, rtol=1e-4, atol=1e-4)
    inverted = editor(controls, num_inference_steps=5, output_type="latent").cells
    assert not torch.allclose(inverted, own, rtol=1e-4, atol=1e-4)  # the Euler round trip alone is not exact


def test_flowedit_is_reproducible_with_a_seed(editor, kang):
    controls = responding_controls(kang, num_cells=20)

    def flowedit(seed: int) -> torch.Tensor:
        return editor(controls, {"condition": "stimulated"}, edit_method="flowedit", num_inference_steps=5,
                      output_type="latent", generator=torch.Generator().manual_seed(seed)).cells

    first = flowedit(0)
    torch.testing.assert_close(first, flowedit(0), rtol=0, atol=0)
    assert not torch.allclose(first, flowedit(1))


def test_unknown_edit_method_names_the_choices(editor, kang):
    with pytest.raises(ConfigurationError, match="edit_method='ddim'.*inversion"):
        editor(responding_controls(kang, num_cells=5), edit_method="ddim")
