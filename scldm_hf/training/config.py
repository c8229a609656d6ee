"""Training configurations: dataclasses parsed by `transformers.HfArgumentParser` from a YAML recipe and the command line.

A recipe (``training/configs/*.yaml``) holds keys shared by every stage at the top level and one section per stage
(``vae``, ``dit``, ``finetune``); a stage reads the top-level keys, then its section, then the command line::

    python training/train_vae.py --config training/configs/pbmc_demo.yaml --max_train_steps 200 --model.hidden_size 32

Model options are typed dataclasses derived from the model's own signature (`SCVAEConfig`'s fields,
`LatentDiTTransformer.__init__`), so a new model option is a training option at once, with its docstring as help.
"""

import argparse
import dataclasses
import difflib
import inspect
import typing
from collections.abc import Iterable, Mapping
from copy import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from diffusers.optimization import SchedulerType
from transformers import HfArgumentParser, PreTrainedConfig
from transformers.utils.auto_docstring import parse_docstring

from scldm_hf.errors import ConfigurationError, check_choice
from scldm_hf.flow_matching import Coupling, DropoutMode, TimestepSampling
from scldm_hf.models.configuration_scvae import SCVAEConfig
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer

from .trackers import check_tracker_names

STAGE_SECTIONS = ("vae", "dit", "finetune")
LRSchedulerName = Literal[tuple(member.value for member in SchedulerType)]


def _model_options(name: str, model: type, parameters: Iterable[tuple[str, type, object]]) -> type:
    """A dataclass of `model`'s constructor `parameters` ``(name, type, default)``, typed, with the model's defaults.

    Each option's help is its entry in the ``Args:`` section of `model`'s docstring.
    """
    docs = parse_docstring(model.__doc__)[0]
    options = dataclasses.make_dataclass(name, [
        (option, annotation, field(default=default, metadata={"help": " ".join(docs[option]["description"].split())}))
        for option, annotation, default in parameters
    ])
    options.__module__ = __name__
    return options


# the gene vocabulary comes from the corpus, the latent statistics from stage 2
VAEModelOptions = _model_options("VAEModelOptions", SCVAEConfig, [
    (spec.name, spec.type, spec.default) for spec in dataclasses.fields(SCVAEConfig)
    if spec.name not in PreTrainedConfig.__dataclass_fields__
    and spec.name not in ("gene_names", "latents_mean", "latents_std")
])
LibrarySizeModel = Literal["labels", "latent", "nearest"]
LIBRARY_SIZE_MODELS = typing.get_args(LibrarySizeModel)
# the latent shape comes from the VAE, the label counts from the corpus
DiTModelOptions = _model_options("DiTModelOptions", LatentDiTTransformer, [
    (parameter.name, parameter.annotation, parameter.default)
    for parameter in list(inspect.signature(LatentDiTTransformer).parameters.values())
    if parameter.name not in ("num_latent_tokens", "latent_dim", "covariate_num_labels")
])


@dataclass
class TrainingConfig:
    """Options shared by every stage: data, optimisation, checkpoints, logging, Hub."""

    early_stopping_metrics: ClassVar[tuple[str, ...]] = ("validation_loss",)  # the held-out scores of the stage
    output_dir: str = field(metadata={"help": "Where the trained model, checkpoints (checkpoints/) and logs (logs/) go."})
    data: str = field(metadata={"help": "A corpus folder (anndata_to_corpus), the Hub dataset id of one (org/name, "
                                        "push_corpus_to_hub), an .h5ad file of raw counts (converted into "
                                        "<output_dir>/corpus first) or a built-in data set (pbmc68k)."})
    data_revision: str | None = field(default=None, metadata={
        "help": "Branch, tag or commit of a Hub dataset id given as data (None: main)."})
    streaming: bool = field(default=False, metadata={
        "help": "Read the corpus (and stage 2's latent cache) as a datasets IterableDataset, record batch by record "
                "batch, each process its own shards (split_dataset_by_node), so memory does not grow with the "
                "corpus. The validation cells are then those whose seeded hash of cell_id falls below "
                "validation_fraction, and the order is a shuffle buffer (shuffle_buffer_size) seeded by seed and "
                "the epoch. False memory-maps the corpus (random access, exact random split)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={
        "help": "Cells in the shuffle buffer of a streaming run (larger: closer to a full shuffle, more memory)."})
    covariates: list[str] = field(default_factory=list, metadata={
        "help": "obs columns kept when data is an .h5ad file (space-separated on the command line)."})
    layer: str | None = field(default=None, metadata={"help": "Layer of the .h5ad holding raw counts (None: X)."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Share of cells held out for the validation metrics of the model card and for early stopping."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop when the held-out loss (checked every validation_steps) has not improved for this many checks "
                "in a row, and keep the weights of the best check (the EMA's for the DiT); max_train_steps is then "
                "an upper bound (the learning-rate schedule still spans max_train_steps: stopping early does not "
                "shorten it). None trains for max_train_steps and keeps the last weights."})
    validation_steps: int = field(default=100, metadata={
        "help": "Compute the held-out scores every this many optimizer steps (all logged; validation_loss is the "
                "held-out training loss) when early_stopping_patience is set."})
    early_stopping_metric: str = field(default="validation_loss", metadata={
        "help": "The held-out score early stopping watches (lower is better): validation_loss for either stage; "
                "the VAE also offers round_trip_mmd, the MMD^2 between held-out cells and their sampled round trips "
                "in a PCA of log1p CP10k fitted on training cells; the DiT generation_mmd, the MMD^2 between held-out "
                "cells and cells generated for their labels (eval_inference_steps, guidance 1) in that PCA, scored only "
                "when watched."})
    seed: int = field(default=0, metadata={"help": "Seed of weights, data order, noise and the validation split."})
    max_train_steps: int = field(default=1000, metadata={
        "help": "Optimizer steps (each of batch_size x gradient_accumulation_steps x processes cells)."})
    batch_size: int = field(default=64, metadata={"help": "Cells per process per micro-batch."})
    max_genes: int | None = field(default=None, metadata={
        "help": "Cap on expressed-gene tokens per cell in the collator (None keeps all)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    lr_scheduler: LRSchedulerName = field(default="cosine", metadata={
        "help": "Learning-rate schedule (diffusers.optimization.SchedulerType), after lr_warmup_steps of warm-up."})
    lr_warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps of the learning rate."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(default=None, metadata={
        "help": "Autocast precision; None takes the `accelerate launch` setting. bf16 on a CPU without bf16 matrix "
                "units (AVX512-BF16 / AMX) trains in float32 instead, with a warning (emulated bf16 is ~7x slower)."})
    cpu: bool = field(default=False, metadata={
        "help": "Train on CPU even if an accelerator is present (required for multi-process CPU runs)."})
    num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads torch uses per process (None: torch's default, one per core). Small models on a busy "
                "machine often train faster on 1 thread than on contended cores."})
    keep_freed_memory: bool = field(default=True, metadata={
        "help": "On CPU with glibc (Linux), let the allocator keep freed memory for reuse (mallopt; environment "
                "variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ you set win), so large "
                "activations are not page-faulted afresh every step: same results, fewer page faults, up to ~1.3 GiB "
                "of freed memory kept by the process."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    checkpointing_steps: int = field(default=500, metadata={
        "help": "Write a resumable checkpoint every this many optimizer steps."})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Keep only the newest this many checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' or a checkpoint folder; 'latest' starts fresh when none exists. Refused when the data, "
                "model config or training options differ from the checkpoint's."})
    resume_with_changes: bool = field(default=False, metadata={
        "help": "Resume even so: the new options apply from the checkpoint's step on, and the changes are recorded "
                "in the following checkpoints (training_state.json)."})
    logging_steps: int = field(default=10, metadata={"help": "Log the running losses every this many steps."})
    report_to: list[str] = field(default_factory=lambda: ["csv"], metadata={
        "help": "Trackers: csv (logs/metrics.csv, ours), none, or any of accelerate's (tensorboard, wandb, mlflow, "
                "comet_ml, aim, clearml, dvclive, swanlab, trackio, all); several are space-separated."})
    push_to_hub: bool = field(default=False, metadata={
        "help": "Upload the final model folder to hub_model_id with huggingface_hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (user/name) of push_to_hub."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    hub_token: str | None = field(default=None, metadata={
        "help": "Hub token (default: the logged-in one); never saved with the config."})

    def __post_init__(self):
        if isinstance(self.report_to, str):  # a single tracker, as a recipe usually writes it
            self.report_to = [self.report_to]
        check_tracker_names(self.report_to)
        _check_choices(self)
        positive = ("max_train_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                    "checkpoints_total_limit", "logging_steps", "learning_rate", "validation_steps", "shuffle_buffer_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name}={getattr(self, name)} must be > 0.")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ConfigurationError(f"num_threads={self.num_threads} must be > 0, or null for torch's default.")
        if self.max_genes is not None and self.max_genes <= 0:
            raise ConfigurationError(f"max_genes={self.max_genes} must be > 0, or null to keep every expressed gene.")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigurationError(f"validation_fraction={self.validation_fraction} must be in [0, 1).")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise ConfigurationError(f"early_stopping_patience={self.early_stopping_patience} must be > 0, or null "
                                     "to train for max_train_steps.")
        if self.early_stopping_metric not in self.early_stopping_metrics:
            raise ConfigurationError(f"early_stopping_metric={self.early_stopping_metric!r} is not a held-out score "
                                     f"of this stage; choose one of {list(self.early_stopping_metrics)}.")
        if self.early_stopping_patience is not None and self.validation_fraction == 0:
            raise ConfigurationError("early_stopping_patience needs held-out cells: set validation_fraction > 0 "
                                     "(e.g. 0.1), or drop early_stopping_patience.")
        if not 0 <= self.lr_warmup_steps <= self.max_train_steps:
            raise ConfigurationError(
                f"lr_warmup_steps={self.lr_warmup_steps} must be between 0 and max_train_steps={self.max_train_steps}."
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigurationError("push_to_hub is set but hub_model_id is empty; pass --hub_model_id user/name.")

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.output_dir) / "checkpoints"


@dataclass
class VAETrainingConfig(TrainingConfig):
    """Stage 1 (`SCVAEModel`)."""

    early_stopping_metrics: ClassVar[tuple[str, ...]] = ("validation_loss", "round_trip_mmd")
    model: VAEModelOptions = field(default_factory=VAEModelOptions, metadata={
        "help": "SCVAEConfig options (the gene vocabulary comes from the corpus)."})
    init_from: str | None = field(default=None, metadata={
        "help": "A saved SCVAEModel folder to continue from (fine-tuning); None trains from scratch."})

    def __post_init__(self):
        super().__post_init__()
        self.model = model_options(VAEModelOptions, self.model)
        if self.init_from is not None and self.model != VAEModelOptions():
            raise ConfigurationError(
                f"init_from={self.init_from!r} fixes the architecture; remove the model options "
                f"{sorted(_changed_options(self.model))}."
            )


@dataclass
class DiTTrainingConfig(TrainingConfig):
    """Stage 2 (`LatentDiTTransformer` on latents of a frozen VAE), saved as a whole `SCLDMPipeline`."""

    early_stopping_metrics: ClassVar[tuple[str, ...]] = ("validation_loss", "generation_mmd")
    vae_name_or_path: str | None = field(default=None, metadata={
        "help": "The stage-1 output folder (or Hub id of an SCVAEModel)."})
    model: DiTModelOptions = field(default_factory=DiTModelOptions, metadata={
        "help": "LatentDiTTransformer options (latent shape and label counts come from the VAE and corpus)."})
    condition_on: list[str] | None = field(default=None, metadata={
        "help": "Corpus covariates the DiT is conditioned on (None: all of them)."})
    condition_dropout: float = field(default=0.1, metadata={
        "help": "Probability of replacing a cell's labels by the null label (classifier-free guidance)."})
    condition_dropout_mode: DropoutMode = field(default="joint", metadata={
        "help": "joint drops all of a cell's labels together; independent drops each covariate on its own, which "
                "lets the model compose covariates (unseen cell type x perturbation pairs)."})
    coupling: Coupling = field(default="independent", metadata={
        "help": "Pairing of noise and latents in a batch: independent draws (the released scLDM); minibatch_ot, the "
                "exact optimal-transport plan of the batch (straighter paths, for fewer sampling steps); "
                "minibatch_ot_by_label, that plan within each group of cells with the same labels."})
    timestep_sampling: TimestepSampling = field(default="uniform", metadata={
        "help": "Distribution of the training noise levels: uniform (the released scLDM) or logit_normal "
                "(sigmoid of a standard normal, SD3), which trains the middle noise levels more."})
    library_size_model: LibrarySizeModel = field(default="latent", metadata={
        "help": "Library sizes of generated cells: labels, a log-normal per label combination; latent, that "
                "log-normal shifted by a ridge regression on the cell's latent (depth follows cell state within a "
                "label); nearest, the depth of one of the generated latent's 5 nearest training cells of its labels "
                "(as scVI's generated cell keeps its training cell's depth). Fine-tuning keeps the pretrained "
                "pipeline's model and adds groups for new labels."})
    use_ema: bool = field(default=True, metadata={
        "help": "Keep an exponential moving average of the DiT weights; the EMA weights are saved."})
    ema_decay: float = field(default=0.999, metadata={"help": "Decay of the EMA."})
    encode_batch_size: int = field(default=256, metadata={
        "help": "Batch size of the one-off encoding of the corpus into cached latents."})
    num_eval_cells: int = field(default=0, metadata={
        "help": "Cells generated at the end and compared with held-out cells for the model card (0 = skip)."})
    eval_inference_steps: int = field(default=20, metadata={
        "help": "Sampling steps of that evaluation and of the generation_mmd early-stopping score."})

    def __post_init__(self):
        super().__post_init__()
        self.model = model_options(DiTModelOptions, self.model)
        if not 0 <= self.condition_dropout <= 1:
            raise ConfigurationError(f"condition_dropout={self.condition_dropout} must be in [0, 1].")
        if not 0 < self.ema_decay < 1:
            raise ConfigurationError(f"ema_decay={self.ema_decay} must be in (0, 1).")
        if self.num_eval_cells < 0:
            raise ConfigurationError(f"num_eval_cells={self.num_eval_cells} must be >= 0.")


@dataclass
class FinetuneConfig(DiTTrainingConfig):
    """Fine-tune a trained `SCLDMPipeline` on new data whose covariates may carry new labels (or new covariates)."""

    pipeline_name_or_path: str | None = field(default=None, metadata={
        "help": "A saved pipeline folder or a Hub repo id (resolved from the local cache when offline)."})
    freeze_existing_labels: bool = field(default=True, metadata={
        "help": "Keep the pretrained label embeddings (and null rows) bit-identical."})
    freeze_vae: bool = field(default=True, metadata={
        "help": "Reuse the pretrained VAE as is; otherwise fine-tune it on the new data first (vae_max_train_steps "
                "at vae_learning_rate) and re-encode."})
    vae_max_train_steps: int = field(default=200, metadata={"help": "VAE fine-tuning steps (freeze_vae false)."})
    vae_learning_rate: float = field(default=1e-4, metadata={"help": "VAE fine-tuning learning rate."})
    local_files_only: bool = field(default=False, metadata={"help": "Never try the network when resolving a Hub id."})

    def __post_init__(self):
        super().__post_init__()
        if not self.pipeline_name_or_path:
            raise ConfigurationError("finetune needs pipeline_name_or_path (a saved SCLDMPipeline folder or Hub id).")
        if self.streaming:
            raise ConfigurationError("finetune reads its data memory-mapped (it re-codes the labels in place); set "
                                     "streaming: false (--streaming false).")
        if self.vae_name_or_path is not None:
            raise ConfigurationError(
                f"finetune uses the VAE of {self.pipeline_name_or_path!r}; remove vae_name_or_path="
                f"{self.vae_name_or_path!r} (set freeze_vae: false to fine-tune that VAE on the new data)."
            )
        if self.model != DiTModelOptions():
            raise ConfigurationError(
                f"finetune keeps the architecture of {self.pipeline_name_or_path!r}; remove the model options "
                f"{sorted(_changed_options(self.model))}."
            )


def model_options(options_class: type, values) -> object:
    """`values` (an `options_class` or a mapping of its fields) as an `options_class`; unknown keys are refused."""
    if isinstance(values, options_class):
        return values
    _check_known(values, [spec.name for spec in dataclasses.fields(options_class)], f"{options_class.__name__}")
    return options_class(**values)


class RecipeParser(HfArgumentParser):
    """`HfArgumentParser` of one stage's config from a YAML recipe (``--config``) and ``--name value`` options.

    The recipe's top-level keys apply first, then its `section`, then the command line. The nested model options
    (the config's ``model`` field) are ``--model.NAME`` options, a ``model:`` mapping in the recipe. Unknown keys and
    bad values raise `ConfigurationError`, naming the closest valid option.
    """

    def __init__(self, config_class: type[TrainingConfig], section: str | None, prog: str | None = None):
        section_keys = f", then its `{section}:` section" if section else ""
        super().__init__(config_class, prog=prog, allow_abbrev=False, description=(
            f"{config_class.__doc__} Options come from the recipe (top-level keys{section_keys}), then the command "
            "line; --help after --config shows the recipe's values as defaults."
        ))
        self.config_class, self.section = config_class, section
        self.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe (training/configs/*.yaml).")

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        if not dataclasses.is_dataclass(field.type):
            return HfArgumentParser._parse_dataclass_field(parser, field)
        group = parser.add_argument_group(f"{field.name} options", f"{field.metadata['help']} Recipe: a "
                                          f"`{field.name}:` mapping; command line: --{field.name}.NAME value.")
        hints = typing.get_type_hints(field.type)
        for option in dataclasses.fields(field.type):
            option = copy(option)
            option.name, option.type = f"{field.name}.{option.name}", hints[option.name]
            HfArgumentParser._parse_dataclass_field(group, option)

    def error(self, message: str):
        raise ConfigurationError(f"{message} (see `{self.prog} --help`)")

    def parse(self, argv: Iterable[str] = (), recipe: str | Path | None = None,
              overrides: Mapping | None = None) -> TrainingConfig:
        """The config from `recipe` (or ``--config`` in `argv`), then `overrides` (``{"model.hidden_size": 32}``
        or nested mappings), then `argv`."""
        recipe_flag = argparse.ArgumentParser(add_help=False)
        recipe_flag.add_argument("--config", default=recipe)
        known, argv = recipe_flag.parse_known_args(list(argv))
        values = _flatten(_read_recipe(known.config, self.section) if known.config else {})
        values.update(_flatten(overrides or {}))
        where = f" (recipe {known.config}, section {self.section!r})" if known.config else ""
        settable = [action.dest for action in self._actions if action.dest not in ("help", "config")]
        _check_known(values, settable, f"{self.config_class.__name__}{where}")
        for action in self._actions:  # recipe values become the defaults (and are shown as such by --help)
            if action.dest in values:
                action.default, action.required = values[action.dest], False

        namespace, unknown = self.parse_known_args(argv)
        if unknown:
            flag = next((token.partition("=")[0] for token in unknown if token.startswith("-")), None)
            if flag is None:
                self.error(f"unexpected argument(s) {unknown}: options are written --name value")
            close = difflib.get_close_matches(flag, self._option_string_actions, n=1)
            self.error(f"unknown option {flag}" + (f"; did you mean {close[0]}?" if close else ""))
        parsed = vars(namespace)
        parsed.pop("config")
        nested = {}
        for key in [key for key in parsed if "." in key]:
            group, name = key.split(".", 1)
            nested.setdefault(group, {})[name] = parsed.pop(key)
        return self.config_class(**parsed, **nested)


def load_config(config_class: type[TrainingConfig], path: str | Path | None = None, overrides: Mapping | None = None,
                section: str | None = None) -> TrainingConfig:
    """`config_class` from the recipe at `path` (its top-level keys, then `section`), then `overrides`.

    Override keys are option names; dotted keys set model options (``{"model.hidden_size": 32}``).
    """
    prog = f"scldm train {section}" if section else None
    return RecipeParser(config_class, section, prog=prog).parse(recipe=path, overrides=overrides)


def config_to_dict(config: TrainingConfig) -> dict:
    """Plain dict of `config` without secrets (for logs, the model card and `training_config.yaml`)."""
    values = dataclasses.asdict(config)
    values.pop("hub_token", None)
    return values


def _read_recipe(path: str | Path, section: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"config file {path} does not exist; pass --config training/configs/<name>.yaml.")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigurationError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(recipe, dict):
        raise ConfigurationError(f"config file {path} must be a mapping of option: value.")
    stage_values = recipe.get(section) or {}
    if not isinstance(stage_values, dict):
        raise ConfigurationError(f"section {section!r} of config file {path} must be a mapping of option: value, "
                                 f"not {type(stage_values).__name__} {stage_values!r}.")
    values = {key: value for key, value in recipe.items() if key not in STAGE_SECTIONS}
    values.update(stage_values)
    return values


def _flatten(values: Mapping, prefix: str = "") -> dict:
    """``{"model": {"hidden_size": 32}}`` -> ``{"model.hidden_size": 32}`` (the parser's option names)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_known(values: Iterable[str], valid: list[str], where: str) -> None:
    """Refuse keys of `values` that are not in `valid`, naming the closest valid one (``hiden_size`` -> ``hidden_size``)."""
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid options: {sorted(valid)}."
            raise ConfigurationError(f"unknown option {key!r} for {where}; {hint}")


def _check_choices(config) -> None:
    """Literal-typed options hold one of their values (argparse checks the command line; this, recipes and Python)."""
    hints = typing.get_type_hints(type(config))
    for spec in dataclasses.fields(config):
        hint, value = hints[spec.name], getattr(config, spec.name)
        literal = next((arg for arg in (hint, *typing.get_args(hint)) if typing.get_origin(arg) is Literal), None)
        if literal is not None and value is not None:
            check_choice(spec.name, value, literal)


def _changed_options(options) -> dict:
    """The options of a model-options dataclass that differ from their defaults."""
    defaults = type(options)()
    return {spec.name: getattr(options, spec.name) for spec in dataclasses.fields(options)
            if getattr(options, spec.name) != getattr(defaults, spec.name)}
