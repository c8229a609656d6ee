"""Model cards (``README.md`` beside the weights) rendered from the Jinja templates in ``model_cards/``.

The card metadata is a ``huggingface_hub.ModelCardData``: library, license, tags, pipeline tag, the Hub dataset and
base model (Hub ids only), and a ``model-index`` of the metrics. Nothing written for upload holds a local path.
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from scldm_hf.data import CorpusInfo
from scldm_hf.data.hub import hub_id
from scldm_hf.resources import resource_dir

from .config import TrainingConfig, config_to_dict

TEMPLATE_DIR = resource_dir("model_cards")
VAE_TEMPLATE = TEMPLATE_DIR / "scvae.md"
PIPELINE_TEMPLATE = TEMPLATE_DIR / "scldm_pipeline.md"
CARD_TAGS = ["single-cell", "scRNA-seq", "biology", "generative", "scldm"]
# Hub task of each library's model: the VAE embeds cells; the Hub has no task for generating cells.
PIPELINE_TAGS = {"transformers": "feature-extraction", "diffusers": "other"}


def portable(value):
    """`value` with every absolute local path reduced to its last part (nested dicts and lists included)."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item) for item in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value


def portable_config(config: TrainingConfig) -> dict:
    """The training config for upload (card and ``training_config.yaml``): no secrets, no absolute local paths."""
    return portable(config_to_dict(config))


def library_size_description(conditioner) -> str:
    """The pipeline card's words for how `conditioner` (a `CellConditioner`) draws generated cells' library sizes."""
    if conditioner.library_size_model == "nearest":
        return (f"library sizes of training cells: each generated latent takes the depth of one of its "
                f"{conditioner.config.library_size_neighbours} nearest training cells of its condition (sequencing "
                "depth follows cell state within a condition)")
    description = "library sizes drawn from a per-condition log-normal model"
    if conditioner.library_size_model == "latent":
        ridge = conditioner.config.latent_library_ridge
        chosen = f"; ridge {ridge:g}, chosen by generalised cross-validation" if ridge is not None else ""
        description += (", shifted by a linear regression on each generated latent (sequencing depth follows cell "
                        f"state within a condition{chosen})")
    return description


@dataclass
class DataProvenance:
    """What a model was trained on, for its card."""

    source: str
    num_cells: int
    num_train_cells: int
    num_validation_cells: int
    num_genes: int
    num_measured_genes: int
    covariates: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_corpus(cls, info: CorpusInfo, num_train_cells: int, num_validation_cells: int,
                    covariates: dict[str, list[str]] | None = None) -> "DataProvenance":
        """Provenance of a corpus split; `covariates` overrides the corpus labels (e.g. a model's grown labels)."""
        return cls(
            source=info.source,
            num_cells=info.num_cells,
            num_train_cells=num_train_cells,
            num_validation_cells=num_validation_cells,
            num_genes=len(info.genes),
            num_measured_genes=len(info.measured_gene_ids),
            covariates=info.covariates if covariates is None else covariates,
        )


def render_model_card(
    template_path: Path,
    config: TrainingConfig,
    provenance: DataProvenance,
    metrics: dict[str, float],
    library_name: str,
    base_model: str | None = None,
    **template_kwargs,
) -> ModelCard:
    """Fill `template_path` with the data provenance, the training config and the evaluation `metrics`.

    The load snippet uses ``config.hub_model_id`` when set, else the output folder's name. `base_model` and
    ``config.data`` go into the metadata only when they are Hub ids (a local path is omitted).
    """
    model_id = config.hub_model_id or Path(config.output_dir).name
    dataset = hub_id(config.data)
    pipeline_tag = PIPELINE_TAGS[library_name]
    eval_results = [
        EvalResult(task_type=pipeline_tag, dataset_type=dataset or "custom", dataset_name=dataset or
                   portable(provenance.source) or "training data (held-out cells)", dataset_split="validation",
                   metric_type=name, metric_name=name, metric_value=float(value))
        for name, value in metrics.items()
    ]
    card_data = ModelCardData(
        library_name=library_name, license="apache-2.0", tags=CARD_TAGS, pipeline_tag=pipeline_tag,
        base_model=hub_id(base_model), datasets=[dataset] if dataset else None,
        model_name=model_id if eval_results else None, eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_id=model_id,
        data=provenance,
        source=portable(provenance.source),
        training_config=yaml.safe_dump(portable_config(config), sort_keys=False).strip(),
        metrics={name: f"{value:.4g}" for name, value in metrics.items()},
        max_steps=config.max_train_steps,
        fine_tuned=base_model is not None,
        **template_kwargs,
    )
