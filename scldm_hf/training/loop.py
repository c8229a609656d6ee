"""The training loop shared by both stages: Accelerate set-up, optimizer and LR schedule, the resumable step loop.

The loop is "infinite epochs until ``max_train_steps``" with gradient accumulation and clipping, EMA updates,
logging every ``logging_steps``, an atomic checkpoint every ``checkpointing_steps`` and, with
``early_stopping_patience``, held-out scores every ``validation_steps`` (all logged) of which the watched one
(``early_stopping_metric``) stops the run when it no longer improves, the best weights being restored. Resuming
restores the step, optimizer, scheduler, EMA, RNG states, the data position (epoch + batches already seen in it)
and early stopping's record with its best weights.
"""

import os
import platform
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from scldm_hf.data import CorpusInfo
from scldm_hf.errors import CheckpointError, ConfigurationError, InputDataError

from .allocator import keep_freed_memory
from .checkpointing import (
    TrainingProgress,
    TrainingState,
    load_checkpoint,
    resolve_checkpoint,
    resume_settings,
    save_checkpoint,
)
from .config import TrainingConfig, config_to_dict
from .trackers import build_trackers

logger = get_logger(__name__)

LossFunction = Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]]
ValidationScores = Callable[[torch.nn.Module], dict[str, float]]


def build_accelerator(config: TrainingConfig) -> Accelerator:
    """An `Accelerator` for `config` (CPU/GPU, DDP, mixed precision, accumulation, trackers, seeded data order)."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
    logging_dir = output_dir / "logs"
    config.mixed_precision = supported_precision(config.mixed_precision, PartialState(cpu=config.cpu).device)
    forget_earlier_precision(config.mixed_precision)
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=build_trackers(config.report_to, logging_dir) or None,  # accelerate warns about an empty list
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    check_distributed_launch(accelerator)
    if config.keep_freed_memory and accelerator.device.type == "cpu":
        keep_freed_memory()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return accelerator


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively: on x86, AVX512-BF16 or AMX; other architectures (Arm's
    bf16 extension) are trusted. Without them torch emulates bf16 matmuls: 1.3 GFLOP/s against float32's 93 on an
    AVX2-only AMD EPYC core (`benchmarks/bench_training.py`), so bf16 autocast trains ~7x slower, not ~1.8x faster."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def supported_precision(mixed_precision: str | None, device: torch.device) -> str | None:
    """`mixed_precision`, or "no" (float32, with a warning) where it asks for bf16 autocast on a CPU without bf16
    matrix units (`cpu_has_bf16_units`): a recipe's bf16 is a speed setting (equal quality, benchmarks/RESULTS.md),
    which such a CPU would turn into a ~7x slowdown. The precision that runs is what the run records."""
    requested = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if requested != "bf16" or device.type != "cpu" or cpu_has_bf16_units():
        return mixed_precision
    logger.warning("mixed_precision='bf16' asked for on a CPU without bf16 matrix units (no AVX512-BF16 or AMX), "
                   "where torch emulates bf16 about 7x slower than float32: training in float32 instead "
                   "(mixed_precision='no'; equal quality). On a GPU or a CPU with those units bf16 is kept.",
                   main_process_only=True)
    return "no"


def forget_earlier_precision(mixed_precision: str | None) -> None:
    """Let a stage choose its own precision after an earlier stage in the same single process chose another.

    Accelerate keeps one `AcceleratorState` per process: after a bf16 VAE, a float32 DiT trained in the same process
    (``train_scldm``, a notebook) would be refused (``mixed_precision='no'``) or silently run in bf16 (``None``). A
    single-process state holds nothing else worth keeping, so it is dropped; a distributed launch keeps its state
    (and the launcher's precision), as Accelerate intends.
    """
    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    requested = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if earlier is not None and earlier != requested and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


@contextmanager
def removed_if_setup_fails(output_dir: str | Path) -> Iterator[None]:
    """Remove the folders the block creates for `output_dir` when it raises; folders that existed before are kept.

    Wraps a run's set-up (accelerator, model, reading the data), so a run that fails there, e.g. on unreadable data,
    leaves no empty output folder behind; training itself runs outside it, so its checkpoints survive a crash.
    """
    path = Path(output_dir).absolute()
    created = next((folder for folder in [*reversed(path.parents), path] if not folder.exists()), None)
    try:
        yield
    except BaseException:
        if created is not None and PartialState().is_main_process:
            shutil.rmtree(created, ignore_errors=True)
        raise


def check_distributed_launch(accelerator: Accelerator) -> None:
    """Refuse a multi-process launch that Accelerate runs as independent single-process copies."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise ConfigurationError(
            f"the launcher started {world_size} processes but Accelerate sees only one (no GPU, and CPU "
            "multi-processing was not requested), so each process would train its own copy of the model. On CPU pass "
            "--cpu (or set ACCELERATE_USE_CPU=1), e.g. `accelerate launch --multi_gpu --num_processes 2 "
            "--mixed_precision no --dynamo_backend no training/train_vae.py --config ... --cpu`."
        )


def build_optimizer(model: torch.nn.Module, config: TrainingConfig, frozen_from_decay: Iterable[torch.nn.Parameter] = ()):
    """AdamW over the trainable parameters; `frozen_from_decay` (e.g. partly frozen embeddings) get no weight decay."""
    no_decay = {id(param) for param in frozen_from_decay}
    trainable = [param for param in model.parameters() if param.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in no_decay], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2))


def build_lr_scheduler(optimizer, config: TrainingConfig, num_processes: int):
    """Warm-up + decay over ``max_train_steps`` (the prepared scheduler steps once per process per optimizer step)."""
    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=config.max_train_steps * num_processes,
    )


def train_loop(
    accelerator: Accelerator,
    config: TrainingConfig,
    model: torch.nn.Module,
    optimizer,
    lr_scheduler,
    dataloader,
    compute_loss: LossFunction,
    corpus: CorpusInfo,
    model_config: Mapping,
    ema: EMAModel | None = None,
    generators: Sequence[torch.Generator] = (),
    validation_scores: ValidationScores | None = None,
) -> TrainingProgress:
    """Train the prepared `model` until ``config.max_train_steps`` (or early stopping); returns the final progress.

    `compute_loss(model, batch)` returns a dict with ``"loss"`` (optimised) and any other scalars to log. `ema` and
    the RNG states of `generators` are saved with every checkpoint; `corpus` and `model_config` (with `config`) are
    what a resumed run must share with its checkpoint. `validation_scores(unwrapped model)` gives the held-out scores
    (lower is better) of which early stopping watches ``config.early_stopping_metric`` (required with
    ``config.early_stopping_patience``).
    """
    progress = TrainingProgress(
        num_processes=accelerator.num_processes,
        total_batch_size=config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
    )
    state = TrainingState(progress, resume_settings(config, corpus, model_config), ema=ema, generators=generators)
    checkpoint = resolve_checkpoint(config.checkpoint_root, config.resume_from_checkpoint)
    if checkpoint is not None:
        expected = (progress.num_processes, progress.total_batch_size)
        configured = optimisation_hyperparameters(optimizer, lr_scheduler)
        if load_checkpoint(accelerator, state, checkpoint, allow_changes=config.resume_with_changes):
            apply_optimisation_hyperparameters(optimizer, lr_scheduler, configured)
        if (progress.num_processes, progress.total_batch_size) != expected:
            raise CheckpointError(
                f"{checkpoint} was written by {progress.num_processes} process(es) with a total batch of "
                f"{progress.total_batch_size} cells; this run has {expected[0]} and {expected[1]}. Resume with the "
                "same launch and batch settings, or start a new output_dir (init_from=...)."
            )
        logger.info(f"resumed from {checkpoint} at step {progress.global_step}", main_process_only=True)

    accelerator.init_trackers(Path(config.output_dir).name, config=_flat_hparams(config))
    unwrapped = accelerator.unwrap_model(model)
    early_stopping = None
    if config.early_stopping_patience is not None:
        if validation_scores is None:
            raise ConfigurationError("early_stopping_patience is set but this stage has no held-out loss to watch.")
        early_stopping = EarlyStopping(state, unwrapped, validation_scores, config.early_stopping_metric,
                                       config.early_stopping_patience, ema)
    running = {}
    bar = tqdm(total=config.max_train_steps, initial=progress.global_step, desc="Training", unit="step",
               disable=not accelerator.is_local_main_process)
    model.train()
    while progress.global_step < config.max_train_steps:
        dataloader.set_epoch(progress.epoch)
        batches = dataloader
        if progress.batches_seen_in_epoch:
            batches = accelerator.skip_first_batches(dataloader, progress.batches_seen_in_epoch)
        for batch in batches:
            with accelerator.accumulate(model):
                losses = compute_loss(model, batch)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            progress.batches_seen_in_epoch += 1
            for name, value in losses.items():
                running[name] = running.get(name, 0.0) + value.detach().float()
            running["micro_batches"] = running.get("micro_batches", 0) + 1
            if not accelerator.sync_gradients:
                continue

            progress.global_step += 1
            bar.update()
            if ema is not None:
                ema.step(unwrapped.parameters())
            if progress.global_step % config.logging_steps == 0 or progress.global_step == config.max_train_steps:
                logs = _mean_over_processes(accelerator, running)
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                accelerator.log(logs, step=progress.global_step)
                bar.set_postfix(loss=f"{logs['loss']:.4g}")
                running = {}
            if early_stopping is not None and progress.global_step % config.validation_steps == 0:
                accelerator.log(early_stopping.check(), step=progress.global_step)
            if progress.global_step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, state, config.checkpoint_root, progress.global_step,
                                config.checkpoints_total_limit)
            if progress.global_step >= config.max_train_steps or (early_stopping and early_stopping.should_stop):
                break
        else:
            if not progress.batches_seen_in_epoch:  # else the loop would wait forever for the first step
                raise InputDataError(f"the training data gave no full batch of batch_size={config.batch_size} cells "
                                     "per process; lower batch_size or add cells.")
            progress.epoch += 1
            progress.batches_seen_in_epoch = 0
        if early_stopping is not None and early_stopping.should_stop:
            logger.info(f"early stopping at step {progress.global_step}: {config.early_stopping_metric} has not "
                        f"improved since step {progress.best_step}", main_process_only=True)
            break
    bar.close()
    if early_stopping is not None:
        early_stopping.restore_best()
    return progress


class EarlyStopping:
    """The held-out scores of the weights a run saves (the EMA's when there is one), and the best of them so far.

    The record (best loss, its step, checks since) lives in ``state.progress`` and the best weights in
    ``state.best_weights``, so checkpoints carry both and a resumed run stops where an uninterrupted one would.

    Args:
        state: the run's `TrainingState`.
        model: the unwrapped model being trained.
        validation_scores: held-out scores of `model`, lower is better (deterministic: fixed noise, eval mode).
        watched: the name of the score that decides (e.g. ``validation_loss``).
        patience: checks in a row without improvement after which `should_stop`.
        ema: the EMA of `model`'s parameters, whose weights are evaluated and kept instead.
    """

    def __init__(self, state: TrainingState, model: torch.nn.Module, validation_scores: ValidationScores,
                 watched: str, patience: int, ema: EMAModel | None = None):
        self.state, self.model, self.validation_scores = state, model, validation_scores
        self.watched, self.patience, self.ema = watched, patience, ema

    @property
    def should_stop(self) -> bool:
        return self.state.progress.checks_without_improvement >= self.patience

    @torch.no_grad()
    def check(self) -> dict[str, float]:
        """Score the current weights on the held-out cells, keep them when the watched score is best; returns the
        scores."""
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        scores = self.validation_scores(self.model)
        score = scores[self.watched]
        if self.ema is not None:
            self.ema.restore(self.model.parameters())
        self.model.train()
        progress = self.state.progress
        if progress.best_validation_loss is None or score < progress.best_validation_loss:
            progress.best_validation_loss, progress.best_step = score, progress.global_step
            progress.checks_without_improvement = 0
            self.state.best_weights = self.kept_weights()
        else:
            progress.checks_without_improvement += 1
        return scores

    def kept_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights the run saves: the EMA shadow parameters, or the model's state dict."""
        if self.ema is not None:
            return {f"shadow.{index}": param.detach().cpu().clone() for index, param in enumerate(self.ema.shadow_params)}
        return {name: value.detach().cpu().clone() for name, value in self.model.state_dict().items()}

    @torch.no_grad()
    def restore_best(self) -> None:
        """Put the best weights back (into the EMA, which the stage copies into the model, or into the model)."""
        best = self.state.best_weights
        if best is None:
            return
        if self.ema is not None:
            for index, param in enumerate(self.ema.shadow_params):
                param.copy_(best[f"shadow.{index}"])
        else:
            self.model.load_state_dict(best)


def optimisation_hyperparameters(optimizer, lr_scheduler) -> tuple[list[dict], list[float]]:
    """The configured hyperparameters of each optimizer parameter group, and the scheduler's base learning rates."""
    groups = [{key: value for key, value in group.items() if key not in ("params", "lr")}
              for group in optimizer.param_groups]
    return groups, list(lr_scheduler.scheduler.base_lrs)


def apply_optimisation_hyperparameters(optimizer, lr_scheduler, hyperparameters: tuple[list[dict], list[float]]) -> None:
    """Put `optimisation_hyperparameters` (of this run's config) back over those restored from a checkpoint, keeping
    the restored moments and step count; the learning rate follows the new schedule from the restored step."""
    groups, base_lrs = hyperparameters
    scheduler = lr_scheduler.scheduler
    scheduler.base_lrs = base_lrs
    for group, values, base_lr, schedule in zip(optimizer.param_groups, groups, base_lrs, scheduler.lr_lambdas):
        group.update(values)
        group["lr"] = base_lr * schedule(scheduler.last_epoch)


def _mean_over_processes(accelerator: Accelerator, running: dict) -> dict[str, float]:
    """Average the summed losses over micro-batches and processes (a collective: every process calls it)."""
    count = running.pop("micro_batches")
    names = sorted(running)
    summed = accelerator.reduce(torch.stack([running[name] for name in names]).to(accelerator.device), "mean")
    return {name: float(value) / count for name, value in zip(names, summed)}


def _flat_hparams(config: TrainingConfig) -> dict:
    """Scalar hyperparameters for the trackers (nested dicts flattened with dots, lists as strings)."""
    flat = {}
    for key, value in config_to_dict(config).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub_key, sub_value in items:
            name = key if sub_key is None else f"{key}.{sub_key}"
            flat[name] = sub_value if isinstance(sub_value, (int, float, str, bool)) else str(sub_value)
    return flat
