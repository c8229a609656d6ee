"""Accelerate training of both scLDM stages, fine-tuning on new conditions, model cards and Hub publishing.

The scripts in the top-level ``training/`` folder and ``scldm train <stage> ...`` run a stage through
`scldm_hf.workflows` (which adds the evaluation of the model cards); `run_training_script` parses its arguments.
Submodules are imported on first use, so a stage only loads what it needs.
"""

import importlib

from scldm_hf.lazy_exports import lazy_getattr

from .config import (
    DiTModelOptions,
    DiTTrainingConfig,
    FinetuneConfig,
    RecipeParser,
    TrainingConfig,
    VAEModelOptions,
    VAETrainingConfig,
    load_config,
)

# stage -> (config class, "module:function" that trains it)
STAGES = {
    "vae": (VAETrainingConfig, "scldm_hf.training.vae:train_vae"),
    "dit": (DiTTrainingConfig, "scldm_hf.training.dit:train_dit"),
    "finetune": (FinetuneConfig, "scldm_hf.training.finetune:finetune"),
}

_EXPORTS = {
    "train_vae": "scldm_hf.training.vae",
    "train_dit": "scldm_hf.training.dit",
    "refit_library_size_model": "scldm_hf.training.dit",
    "finetune": "scldm_hf.training.finetune",
    "push_folder_to_hub": "scldm_hf.training.hub",
    "DataProvenance": "scldm_hf.training.model_card",
    "render_model_card": "scldm_hf.training.model_card",
    "TrainingProgress": "scldm_hf.training.checkpointing",
    "list_checkpoints": "scldm_hf.training.checkpointing",
    "resolve_checkpoint": "scldm_hf.training.checkpointing",
}


def run_training_script(stage: str, argv: list[str], prog: str | None = None, **train_kwargs) -> str:
    """Run `stage` (``vae``, ``dit`` or ``finetune``) with ``--config recipe.yaml`` and ``--name value`` overrides.

    `train_kwargs` go to the stage's training function (e.g. ``card_metrics``; `scldm_hf.workflows` passes it).
    """
    config_class, target = STAGES[stage]
    config = RecipeParser(config_class, stage, prog=prog).parse(argv)
    module, function = target.split(":")
    getattr(importlib.import_module(module), function)(config, **train_kwargs)
    return f"{stage}: model saved to {config.output_dir}"


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = sorted([
    "DiTModelOptions", "DiTTrainingConfig", "FinetuneConfig", "RecipeParser", "TrainingConfig", "VAEModelOptions",
    "VAETrainingConfig", "load_config", "run_training_script", *_EXPORTS,
])
