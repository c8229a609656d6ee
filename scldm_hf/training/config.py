"""Training configurations: dataclasses filled from a YAML recipe plus command-line overrides.

A recipe (``training/configs/*.yaml``) holds keys shared by every stage at the top level and one section per stage
(``vae``, ``dit``, ``finetune``); a stage reads the top-level keys, then its section, then the command line::

    python training/train_vae.py --config training/configs/pbmc_demo.yaml --max_train_steps 200 model.hidden_size=32
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from diffusers.optimization import SchedulerType

from scldm_hf.errors import ConfigurationError

STAGE_SECTIONS = ("vae", "dit", "finetune")
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
REPORT_TO_CHOICES = ("csv", "tensorboard", "none")


@dataclass
class TrainingConfig:
    """Options shared by every stage (data, optimisation, checkpoints, logging, Hub).

    Args:
        output_dir: Where the trained model, checkpoints (``checkpoints/``) and logs (``logs/``) go.
        data: A corpus folder (``anndata_to_corpus``) or an ``.h5ad`` file of raw counts, converted into
            ``<output_dir>/corpus`` first.
        covariates: ``obs`` columns kept when ``data`` is an ``.h5ad`` file.
        layer: Layer of the ``.h5ad`` holding raw counts (default ``X``).
        validation_fraction: Share of cells held out for the validation metrics in the model card.
        max_train_steps: Optimizer steps (each of ``batch_size x gradient_accumulation_steps x processes`` cells).
        batch_size: Cells per process per micro-batch.
        max_genes: Cap on expressed-gene tokens per cell in the collator (``None`` keeps all).
        lr_scheduler: A ``diffusers.optimization.SchedulerType`` name; warms up over ``lr_warmup_steps``.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``; ``None`` takes the ``accelerate launch`` setting.
        cpu: Train on CPU even if an accelerator is present (required for multi-process CPU runs).
        num_threads: CPU threads torch uses per process (``None`` keeps torch's default, one per core). Small models
            on a busy machine often train faster on 1 thread than on contended cores.
        checkpointing_steps: Write a resumable checkpoint every this many optimizer steps.
        checkpoints_total_limit: Keep only the newest this many checkpoints.
        resume_from_checkpoint: ``"latest"`` or a checkpoint folder; ``"latest"`` starts fresh when none exists.
            Refused when the data, model config or training options differ from the checkpoint's.
        resume_with_changes: Resume even so: the new options apply from the checkpoint's step on, and the changes
            are recorded in the following checkpoints (``training_state.json``).
        report_to: ``"csv"`` (``logs/metrics.csv``), ``"tensorboard"`` or ``"none"``.
        push_to_hub: Upload the final model folder to ``hub_model_id`` with ``huggingface_hub``.
    """

    output_dir: str
    data: str
    covariates: list[str] = field(default_factory=list)
    layer: str | None = None
    validation_fraction: float = 0.1
    seed: int = 0
    max_train_steps: int = 1000
    batch_size: int = 64
    max_genes: int | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    cpu: bool = False
    num_threads: int | None = None
    dataloader_num_workers: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = None
    resume_with_changes: bool = False
    logging_steps: int = 10
    report_to: str = "csv"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    hub_token: str | None = None

    def __post_init__(self):
        _coerce_field_types(self)
        positive = ("max_train_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                    "checkpoints_total_limit", "logging_steps", "learning_rate")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name}={getattr(self, name)} must be > 0.")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ConfigurationError(f"num_threads={self.num_threads} must be > 0, or null for torch's default.")
        if self.max_genes is not None and self.max_genes <= 0:
            raise ConfigurationError(f"max_genes={self.max_genes} must be > 0, or null to keep every expressed gene.")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigurationError(f"validation_fraction={self.validation_fraction} must be in [0, 1).")
        if not 0 <= self.lr_warmup_steps <= self.max_train_steps:
            raise ConfigurationError(
                f"lr_warmup_steps={self.lr_warmup_steps} must be between 0 and max_train_steps={self.max_train_steps}."
            )
        _check_choice("lr_scheduler", self.lr_scheduler, [member.value for member in SchedulerType])
        _check_choice("report_to", self.report_to, REPORT_TO_CHOICES)
        if self.mixed_precision is not None:
            _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_CHOICES)
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigurationError("push_to_hub is set but hub_model_id is empty; pass --hub_model_id user/name.")

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.output_dir) / "checkpoints"


@dataclass
class VAETrainingConfig(TrainingConfig):
    """Stage 1 (`SCVAEModel`).

    Args:
        model: `SCVAEConfig` keyword arguments (the gene vocabulary comes from the corpus).
        init_from: A saved `SCVAEModel` folder to continue from (fine-tuning); ``None`` trains from scratch.
    """

    model: dict = field(default_factory=dict)
    init_from: str | None = None


@dataclass
class DiTTrainingConfig(TrainingConfig):
    """Stage 2 (`LatentDiTTransformer` on latents of a frozen VAE), saved as a whole `SCLDMPipeline`.

    Args:
        vae_name_or_path: The stage-1 output folder (or Hub id of an `SCVAEModel`).
        model: `LatentDiTTransformer` keyword arguments (latent shape and label counts come from the VAE and corpus).
        condition_on: Corpus covariates the DiT is conditioned on (default: all of them).
        condition_dropout: Probability of replacing a cell's labels by the null label (classifier-free guidance).
        condition_dropout_mode: ``"joint"`` drops all of a cell's labels together; ``"independent"`` drops each
            covariate on its own, which lets the model compose covariates (unseen cell type x perturbation pairs).
        use_ema / ema_decay: Keep an exponential moving average of the DiT weights; the EMA weights are saved.
        encode_batch_size: Batch size of the one-off encoding of the corpus into cached latents.
        num_eval_cells: Cells generated at the end and compared with held-out cells for the model card (0 = skip).
    """

    vae_name_or_path: str | None = None
    model: dict = field(default_factory=dict)
    condition_on: list[str] | None = None
    condition_dropout: float = 0.1
    condition_dropout_mode: str = "joint"
    use_ema: bool = True
    ema_decay: float = 0.999
    encode_batch_size: int = 256
    num_eval_cells: int = 0
    eval_inference_steps: int = 20

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.condition_dropout <= 1:
            raise ConfigurationError(f"condition_dropout={self.condition_dropout} must be in [0, 1].")
        _check_choice("condition_dropout_mode", self.condition_dropout_mode, ("joint", "independent"))
        if not 0 < self.ema_decay < 1:
            raise ConfigurationError(f"ema_decay={self.ema_decay} must be in (0, 1).")
        if self.num_eval_cells < 0:
            raise ConfigurationError(f"num_eval_cells={self.num_eval_cells} must be >= 0.")


@dataclass
class FinetuneConfig(DiTTrainingConfig):
    """Fine-tune a trained `SCLDMPipeline` on new data whose covariates may carry new labels (or new covariates).

    Args:
        pipeline_name_or_path: A saved pipeline folder or a Hub repo id (resolved from the local cache when offline).
        freeze_existing_labels: Keep the pretrained label embeddings (and null rows) bit-identical.
        freeze_vae: Reuse the pretrained VAE as is; otherwise fine-tune it on the new data first
            (``vae_max_train_steps`` at ``vae_learning_rate``) and re-encode.
        local_files_only: Never try the network when resolving a Hub id.
    """

    pipeline_name_or_path: str | None = None
    freeze_existing_labels: bool = True
    freeze_vae: bool = True
    vae_max_train_steps: int = 200
    vae_learning_rate: float = 1e-4
    local_files_only: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not self.pipeline_name_or_path:
            raise ConfigurationError("finetune needs pipeline_name_or_path (a saved SCLDMPipeline folder or Hub id).")
        if self.vae_name_or_path is not None:
            raise ConfigurationError(
                f"finetune uses the VAE of {self.pipeline_name_or_path!r}; remove vae_name_or_path="
                f"{self.vae_name_or_path!r} (set freeze_vae: false to fine-tune that VAE on the new data)."
            )


def load_config(config_class: type[TrainingConfig], path: str | Path | None = None, overrides: dict | None = None,
                section: str | None = None) -> TrainingConfig:
    """Build `config_class` from the top-level keys of the YAML at `path`, its `section`, then `overrides`.

    Dotted override keys set nested values (``{"model.hidden_size": 32}``).
    """
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"config file {path} does not exist; pass --config training/configs/<name>.yaml.")
        recipe = yaml.safe_load(path.read_text()) or {}
        values = {key: value for key, value in recipe.items() if key not in STAGE_SECTIONS}
        if section is not None:
            values.update(recipe.get(section) or {})
    for key, value in (overrides or {}).items():
        _set_dotted(values, key, value)

    names = {spec.name for spec in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {unknown} for {config_class.__name__}"
            f"{f' (section {section!r} of {path})' if path else ''}; valid options: {sorted(names)}."
        )
    missing = sorted(spec.name for spec in dataclasses.fields(config_class)
                     if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
                     and spec.name not in values)
    if missing:
        raise ConfigurationError(f"{config_class.__name__} needs {missing}; set them in the YAML or as --name value.")
    return config_class(**values)


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """``["--config", "a.yaml", "--lr", "1e-3", "model.hidden_size=32", "--push_to_hub"]`` -> (config path, overrides).

    Values are parsed as YAML scalars/lists (``--covariates "[cell_type]"``); a flag without a value means ``true``.
    """
    config_path, overrides = None, {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            if not sep:
                has_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
                value = argv[index + 1] if has_value else "true"
                index += has_value
        else:
            key, sep, value = token.partition("=")
            if not sep:
                raise ConfigurationError(f"argument {token!r} is neither --key value nor key=value.")
        key = key.replace("-", "_")
        if key == "config":
            config_path = value
        else:
            overrides[key] = yaml.safe_load(value)
        index += 1
    return config_path, overrides


def config_to_dict(config: TrainingConfig) -> dict:
    """Plain dict of `config` without secrets (for logs, the model card and `training_config.yaml`)."""
    values = dataclasses.asdict(config)
    values.pop("hub_token", None)
    return values


def _set_dotted(values: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for parent in parents:
        values = values.setdefault(parent, {})
        if not isinstance(values, dict):
            raise ConfigurationError(f"cannot set {key!r}: {parent!r} is not a mapping.")
    values[leaf] = value


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigurationError(f"{name}={value!r} is not one of {list(choices)}.")


def _coerce_field_types(config) -> None:
    """Cast YAML values to the annotated types (YAML reads ``1e-3`` as a string, a single covariate as a str)."""
    hints = typing.get_type_hints(type(config))
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if value is None:
            continue
        expected = hints[spec.name]
        if isinstance(expected, types.UnionType):
            expected = next(arg for arg in typing.get_args(expected) if arg is not type(None))
        origin = typing.get_origin(expected) or expected
        try:
            if origin is list:
                value = [value] if isinstance(value, str) else list(value)
            elif origin is bool:
                if not isinstance(value, bool):
                    raise ValueError
            elif origin in (int, float, str):
                converted = origin(value)
                if origin is int and converted != float(value):
                    raise ValueError
                value = converted
            elif origin is dict and not isinstance(value, dict):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"{type(config).__name__}.{spec.name}={value!r} is not a valid {getattr(expected, '__name__', expected)}."
            ) from None
        setattr(config, spec.name, value)
