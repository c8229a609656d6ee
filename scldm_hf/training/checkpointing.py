"""Crash-safe training checkpoints on top of `Accelerator.save_state` / `load_state`, with no code in them.

A checkpoint is written into ``checkpoints/.tmp-checkpoint-<step>`` and renamed to ``checkpoints/checkpoint-<step>``
only once every process has finished writing, so a folder named ``checkpoint-*`` is always complete: a crash (even
``kill -9``) during a write leaves the previous checkpoints untouched and a ``.tmp-*`` folder that the next save or
resume removes. Accelerate saves the model (safetensors), optimizer and LR scheduler (read back with
``weights_only=True``). Our own state is a `TrainingState`, never pickled: ``training_state.json`` (the step, the
position in the data, the EMA's counters and the run's settings), ``ema.safetensors`` (EMA weights) and
``best_weights.safetensors`` (the best weights so far, with early stopping),
``rng_state_<process>.safetensors`` (torch, CUDA, numpy and python RNG states and the data generators). Nothing is
registered with `Accelerator.register_for_checkpointing`, whose ``custom_checkpoint_*.pkl`` files are unpickled with
``weights_only=False`` (they can run code), so such a file in a checkpoint is never read.
"""

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import SAFE_WEIGHTS_NAME
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scldm_hf.data import CorpusInfo
from scldm_hf.errors import CheckpointError

from .config import TrainingConfig, config_to_dict

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_PREFIX = ".tmp-"
TRAINING_STATE_FILE = "training_state.json"
EMA_WEIGHTS_FILE = "ema.safetensors"
BEST_WEIGHTS_FILE = "best_weights.safetensors"
RNG_STATE_FILE = "rng_state_{process}.safetensors"
# Options that may change between a checkpoint and its resumption (where outputs go, logging, hardware use).
# `data` is here because a corpus may move; `data_revision` is not: another revision is other data, so resuming
# with it is refused unless resume_with_changes is set.
RUN_ONLY_OPTIONS = {
    "output_dir", "data", "resume_from_checkpoint", "resume_with_changes", "logging_steps", "report_to",
    "checkpointing_steps", "checkpoints_total_limit", "push_to_hub", "hub_model_id", "hub_private", "num_threads",
    "keep_freed_memory", "dataloader_num_workers", "encode_batch_size", "num_eval_cells", "eval_inference_steps",
    "local_files_only",
}
# Seconds to wait between writing a checkpoint and committing it (fault-injection for the crash tests).
WRITE_DELAY_ENV = "SCLDM_CHECKPOINT_WRITE_DELAY"


@dataclass
class TrainingProgress:
    """Where training stands.

    ``epoch`` and ``batches_seen_in_epoch`` (micro-batches per process) locate the next batch: the sampler order of
    an epoch is a function of (seed, epoch), so resuming skips ``batches_seen_in_epoch`` batches of that epoch.
    ``best_validation_loss`` (the best of the watched score, ``early_stopping_metric``), ``best_step`` and
    ``checks_without_improvement`` are early stopping's record.
    """

    global_step: int = 0
    epoch: int = 0
    batches_seen_in_epoch: int = 0
    num_processes: int = 1
    total_batch_size: int = 0
    best_validation_loss: float | None = None
    best_step: int = 0
    checks_without_improvement: int = 0


class TrainingState:
    """Our part of a checkpoint (JSON + safetensors): progress, run settings, EMA, RNG states and `generators`.

    Args:
        progress: The step and data position, updated in place by the loop.
        settings: What the run must share with a checkpoint to resume from it (`resume_settings`).
        ema: The EMA of the weights, if any.
        generators: Extra `torch.Generator`s of this process (e.g. the collator's gene subsampling).

    ``best_weights`` (name -> CPU tensor) are the weights of the best validation check, kept by early stopping.
    """

    def __init__(self, progress: TrainingProgress, settings: dict, ema: EMAModel | None = None,
                 generators: Sequence[torch.Generator] = ()):
        self.progress = progress
        self.settings = settings
        self.ema = ema
        self.generators = list(generators)
        self.resumed_with_changes: list[dict] = []
        self.best_weights: dict[str, torch.Tensor] | None = None

    def save(self, directory: Path, process_index: int, is_main_process: bool) -> None:
        """Write this process's RNG states; the main process also writes the JSON and the EMA weights."""
        tensors, metadata = rng_states(self.generators)
        save_file(tensors, directory / RNG_STATE_FILE.format(process=process_index), metadata=metadata)
        if not is_main_process:
            return
        ema_counters = {}
        if self.ema is not None:
            ema_counters = {key: value for key, value in self.ema.state_dict().items() if key != "shadow_params"}
            shadow = {f"shadow.{index}": param.detach().cpu().contiguous()
                      for index, param in enumerate(self.ema.shadow_params)}
            save_file(shadow, directory / EMA_WEIGHTS_FILE)
        if self.best_weights is not None:
            save_file(self.best_weights, directory / BEST_WEIGHTS_FILE)
        (directory / TRAINING_STATE_FILE).write_text(json.dumps({
            "progress": asdict(self.progress), "settings": self.settings, "ema": ema_counters,
            "resumed_with_changes": self.resumed_with_changes,
        }, indent=1))

    @staticmethod
    def read(directory: Path) -> dict:
        """The ``training_state.json`` of checkpoint `directory`."""
        path = directory / TRAINING_STATE_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"{path} is missing or unreadable ({type(error).__name__}: {error}): the checkpoint is incomplete or "
                "was written by an older scldm-hf; resume from another checkpoint or start a new output_dir."
            ) from error

    def load(self, directory: Path, saved: dict, process_index: int) -> None:
        """Restore progress, EMA and RNG states from `directory` (`saved` is its ``training_state.json``)."""
        for key, value in saved["progress"].items():
            setattr(self.progress, key, value)
        self.resumed_with_changes = list(saved.get("resumed_with_changes", []))
        if self.ema is not None:
            shadow, _ = _read_safetensors(directory / EMA_WEIGHTS_FILE, "EMA weights")
            device = self.ema.shadow_params[0].device
            params = [shadow[f"shadow.{index}"].to(device) for index in range(len(shadow))]
            self.ema.load_state_dict({**saved["ema"], "shadow_params": params})
        if self.progress.best_validation_loss is not None:
            self.best_weights = _read_safetensors(directory / BEST_WEIGHTS_FILE, "best weights of early stopping")[0]
        tensors, metadata = _read_safetensors(directory / RNG_STATE_FILE.format(process=process_index),
                                              "random number generator states")
        set_rng_states(tensors, metadata, self.generators)


def rng_states(generators: Sequence[torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states as safetensors tensors and string metadata (python, numpy, torch, CUDA, `generators`)."""
    python_version, python_state, python_gauss = random.getstate()
    _, numpy_key, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "numpy": torch.from_numpy(numpy_key.astype(np.int64)),
        "torch": torch.get_rng_state(),
        **{f"generator.{index}": generator.get_state() for index, generator in enumerate(generators)},
    }
    if torch.cuda.is_available():
        tensors |= {f"cuda.{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())}
    metadata = {"python_version": str(python_version), "python_gauss": json.dumps(python_gauss),
                "numpy_position": str(numpy_position), "numpy_has_gauss": str(numpy_has_gauss),
                "numpy_gauss": repr(float(numpy_gauss))}
    return tensors, metadata


def set_rng_states(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                   generators: Sequence[torch.Generator]) -> None:
    """Inverse of `rng_states`."""
    random.setstate((int(metadata["python_version"]), tuple(tensors["python"].tolist()),
                     json.loads(metadata["python_gauss"])))
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), int(metadata["numpy_position"]),
                         int(metadata["numpy_has_gauss"]), float(metadata["numpy_gauss"])))
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[name] for name in sorted(tensors) if name.startswith("cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    for index, generator in enumerate(generators):
        generator.set_state(tensors[f"generator.{index}"])


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint file, or a `CheckpointError` saying it is missing or damaged."""
    if not path.is_file():
        raise CheckpointError(
            f"{path} ({what}) is missing: without it the run cannot continue exactly where it stopped. Resume from "
            "another checkpoint, or start a new output_dir."
        )
    try:
        with safe_open(str(path), framework="pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}, file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} ({what}) is truncated or corrupted ({error}); resume from another checkpoint.") from error


def list_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    """Complete checkpoints under `checkpoint_root`, oldest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(checkpoint_root: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest complete checkpoint or None; a path -> that folder (checked)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(checkpoint_root)
        if not checkpoints:
            logger.info(f"no checkpoint in {checkpoint_root}; starting a new run", main_process_only=True)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not (path / SAFE_WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} is not a complete checkpoint folder (no {SAFE_WEIGHTS_NAME}); "
            f"pass 'latest' or one of {[str(p) for p in list_checkpoints(checkpoint_root)]}."
        )
    return path


def save_checkpoint(accelerator: Accelerator, state: TrainingState, checkpoint_root: str | Path, step: int,
                    total_limit: int) -> Path:
    """Atomically write ``checkpoint-<step>`` with `state` (all processes must call this), then keep the newest
    `total_limit`."""
    root = Path(checkpoint_root)
    final = root / f"checkpoint-{step}"
    temporary = root / f"{TEMPORARY_PREFIX}{final.name}"
    if accelerator.is_main_process:
        remove_incomplete_checkpoints(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    state.save(temporary, accelerator.process_index, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        time.sleep(float(os.environ.get(WRITE_DELAY_ENV, "0")))
        _fsync_folder(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
        _fsync_path(root)
        for stale in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, state: TrainingState, path: Path, allow_changes: bool = False) -> dict:
    """Restore checkpoint `path` into the prepared objects and `state`, after checking that it was written by a run
    with the same settings (`resume_settings`); returns the differences, which `allow_changes` accepts (they are
    logged and recorded in `state`)."""
    planted = sorted(file.name for file in path.glob("custom_checkpoint_*.pkl"))
    if planted:
        raise CheckpointError(
            f"{path} holds {planted}: pickles that Accelerate would unpickle with weights_only=False (they can run "
            "code) and that scldm-hf never writes. They were not read; resume from a checkpoint you wrote yourself."
        )
    saved = TrainingState.read(path)
    changes = settings_differences(saved["settings"], state.settings)
    if changes and not allow_changes:
        listed = "; ".join(f"{name}: {_short(old)} in the checkpoint, {_short(new)} now"
                           for name, (old, new) in changes.items())
        raise CheckpointError(
            f"cannot resume from {path}: this run differs from the one that wrote it ({listed}). Resume with the "
            "checkpoint's settings and data, start a new output_dir, or pass --resume_with_changes true to continue "
            "with the new settings (recorded in the checkpoints and training_config.yaml)."
        )
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # torch.load / safetensors raise UnpicklingError, EOFError, ... on a damaged file
        raise CheckpointError(
            f"checkpoint {path} could not be restored ({type(error).__name__}: {error}); it does not match this "
            "model/configuration or is damaged. Resume with the same config, or delete it to fall back to an older one."
        ) from error
    state.load(path, saved, accelerator.process_index)
    if changes:
        logger.warning(f"resuming from {path} with changed settings {sorted(changes)}", main_process_only=True)
        state.resumed_with_changes.append({"step": state.progress.global_step, "changes": changes})
    return changes


def resume_settings(config: TrainingConfig, corpus: CorpusInfo, model_config: Mapping) -> dict:
    """What a resumed run must share with its checkpoint: training options (bar the run-only ones), model config and
    the identity of the data (source, cells, genes, covariate label names), as JSON values."""
    training = {key: value for key, value in config_to_dict(config).items() if key not in RUN_ONLY_OPTIONS}
    model = {key: value for key, value in model_config.items()
             if not key.startswith("_") and not key.endswith("_version")}
    data = {
        "source": corpus.source,
        "num_cells": corpus.num_cells,
        "genes_sha256": hashlib.sha256("\n".join(corpus.genes).encode()).hexdigest(),
        "measured_gene_ids_sha256": hashlib.sha256(json.dumps(corpus.measured_gene_ids).encode()).hexdigest(),
        "covariates": corpus.covariates,
    }
    return json.loads(json.dumps({"training": training, "model": model, "data": data}))


def settings_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """``{"section.key": (saved value, current value)}`` of every setting that differs."""
    return {
        f"{section}.{key}": (saved.get(section, {}).get(key), values.get(key))
        for section, values in current.items()
        for key in sorted(set(values) | set(saved.get(section, {})))
        if saved.get(section, {}).get(key) != values.get(key)
    }


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}..."


def remove_incomplete_checkpoints(checkpoint_root: Path) -> None:
    """Delete ``.tmp-*`` folders left by a crash during a checkpoint write."""
    if checkpoint_root.is_dir():
        for path in checkpoint_root.glob(f"{TEMPORARY_PREFIX}*"):
            logger.warning(f"removing incomplete checkpoint {path} (a previous run stopped while writing it)")
            shutil.rmtree(path)


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        _fsync_path(path)
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
