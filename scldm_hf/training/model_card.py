"""Model cards (``README.md`` beside the weights) rendered from the Jinja templates in ``model_cards/``."""

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from scldm_hf.data import CorpusInfo

from .config import TrainingConfig, config_to_dict

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "model_cards"
VAE_TEMPLATE = TEMPLATE_DIR / "scvae.md"
PIPELINE_TEMPLATE = TEMPLATE_DIR / "scldm_pipeline.md"
CARD_TAGS = ["single-cell", "scRNA-seq", "biology", "generative", "scldm"]


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

    The load snippet uses ``config.hub_model_id`` when set, else the output folder.
    """
    card_data = ModelCardData(library_name=library_name, license="apache-2.0", tags=CARD_TAGS, base_model=base_model)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_id=config.hub_model_id or str(config.output_dir),
        data=provenance,
        training_config=yaml.safe_dump(config_to_dict(config), sort_keys=False).strip(),
        metrics={name: f"{value:.4g}" for name, value in metrics.items()},
        max_steps=config.max_train_steps,
        **template_kwargs,
    )
