"""Train scLDM and its peers on one split of real cells and evaluate all of them against the same held-out cells.

The models compared, each generating as many cells per condition as the held-out set has, each scored by
`evaluate_generation` with the training cells as reference and, beside every score, the floor: real cells from a
third split used by no model (training cells would not do: the PCA is fitted on them, which makes them look closer
to each other than to any unseen cells):
- ``scLDM``: both stages trained with a recipe YAML (``training/configs/*.yaml``), sampled with `SCLDMPipeline`;
- ``scVI``: scvi-tools' SCVI at its defaults (epoch heuristic, no early stopping), latents from the aggregate posterior of each condition (`ScviGenerator`);
- ``naive NB``: independent per-gene negative binomials per condition (`NaiveNBBaseline`).

Used by ``make demo`` (`scldm_hf.demo`) and ``benchmarks/bench_generation.py``.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from anndata import AnnData
from sklearn.model_selection import train_test_split

from scldm_hf.evaluation import NaiveNBBaseline, ProtocolCardMetrics, ScviGenerator, evaluate_generation, summarize
from scldm_hf.loading import load_pipeline
from scldm_hf.training import DiTTrainingConfig, VAETrainingConfig, load_config
from scldm_hf.training.dit import train_dit
from scldm_hf.training.hub import TRAINING_CONFIG_FILE
from scldm_hf.training.model_card import portable_config
from scldm_hf.training.vae import train_vae


@dataclass
class SideBySideResult:
    """`summary`: one row per model (metrics averaged over conditions, their ``*_real_floor``, ``wall_time_s`` and
    ``cpu_time_s`` of training plus sampling);
    `per_condition`: each model's full table; `generated`: each model's cells; `pipeline_dir`: the trained scLDM."""

    summary: pd.DataFrame
    per_condition: dict[str, pd.DataFrame]
    generated: dict[str, AnnData]
    pipeline_dir: Path
    wall_time_s: dict[str, float] = field(default_factory=dict)


def stratified_split(
    adata: AnnData, label_key: str, fractions: tuple[float, ...] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[AnnData, ...]:
    """Cells split into ``len(fractions)`` disjoint parts (e.g. train / floor / test) keeping each label's share."""
    remaining, parts, left = np.arange(adata.n_obs), [], 1.0
    for fraction in fractions[:-1]:
        taken, remaining = train_test_split(
            remaining, train_size=fraction / left, random_state=seed, stratify=adata.obs[label_key].to_numpy()[remaining]
        )
        parts.append(taken)
        left -= fraction
    parts.append(remaining)
    return tuple(adata[np.sort(part)].copy() for part in parts)


def was_trained_with(model_dir: Path, config: VAETrainingConfig) -> bool:
    """Whether `model_dir` holds weights, a corpus and a ``training_config.yaml`` equal to `config`."""
    saved = model_dir / TRAINING_CONFIG_FILE
    return (
        (model_dir / "model.safetensors").is_file()
        and (model_dir / "corpus").is_dir()
        and saved.is_file()
        and yaml.safe_load(saved.read_text()) == portable_config(config)
    )


def train_scldm(
    train: AnnData,
    label_key: str,
    recipe: str | Path,
    output_dir: Path,
    overrides: dict | None = None,
    dit_overrides: dict | None = None,
    reuse_vae: bool = False,
) -> Path:
    """Both stages on `train` (written as ``output_dir/train.h5ad``) with `recipe`; returns the pipeline folder.

    `overrides` apply to both stages, `dit_overrides` to the DiT stage only. `reuse_vae` skips the VAE stage when
    ``output_dir/vae`` holds a VAE trained with the very same training config (a rerun that changes only the DiT: VAE
    training is deterministic for a seed on one CPU thread, so the reused VAE is the one this call would train).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    train_path = output_dir / "train.h5ad"
    train.write_h5ad(train_path)
    shared = {"covariates": [label_key], **(overrides or {})}
    vae_dir, pipeline_dir = output_dir / "vae", output_dir / "pipeline"
    vae_config = load_config(VAETrainingConfig, recipe, {**shared, "output_dir": str(vae_dir), "data": str(train_path)},
                             section="vae")
    if not (reuse_vae and was_trained_with(vae_dir, vae_config)):
        train_vae(vae_config, ProtocolCardMetrics())
    dit_overrides = {
        **shared, **(dit_overrides or {}),
        "output_dir": str(pipeline_dir), "data": str(vae_dir / "corpus"), "vae_name_or_path": str(vae_dir),
    }
    train_dit(load_config(DiTTrainingConfig, recipe, dit_overrides, section="dit"), ProtocolCardMetrics())
    return pipeline_dir


def run_side_by_side(
    train: AnnData,
    floor: AnnData,
    test: AnnData,
    label_key: str,
    recipe: str | Path,
    output_dir: str | Path,
    *,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 25,
    scvi_epochs: int | None = None,
    seed: int = 0,
    recipe_overrides: dict | None = None,
) -> SideBySideResult:
    """Fit every model on `train`, generate `test`'s label composition, evaluate each against `test` with the
    `floor` cells as the real floor beside every score."""
    output_dir = Path(output_dir)
    labels = test.obs[label_key].astype(str).to_numpy()
    generated, wall_time, cpu_time = {}, {}, {}
    start, cpu_start = time.perf_counter(), time.process_time()
    pipeline_dir = train_scldm(train, label_key, recipe, output_dir / "scldm", recipe_overrides)
    pipe = load_pipeline(pipeline_dir)
    generated["scLDM"] = pipe(
        conditions={label_key: list(labels)},
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
    ).cells
    wall_time["scLDM"], cpu_time["scLDM"] = time.perf_counter() - start, time.process_time() - cpu_start

    for name, baseline in (
        ("scVI", ScviGenerator(label_key, max_epochs=scvi_epochs, seed=seed)),
        ("naive NB", NaiveNBBaseline(label_key)),
    ):
        start, cpu_start = time.perf_counter(), time.process_time()
        generated[name] = baseline.fit(train).sample(labels, seed=seed)
        wall_time[name], cpu_time[name] = time.perf_counter() - start, time.process_time() - cpu_start

    per_condition = {
        name: evaluate_generation(test, cells, label_key, reference=train, real_floor=floor, seed=seed)
        for name, cells in generated.items()
    }
    summary = summarize(per_condition)
    summary["wall_time_s"], summary["cpu_time_s"] = pd.Series(wall_time), pd.Series(cpu_time)
    return SideBySideResult(summary, per_condition, generated, pipeline_dir, wall_time)
