"""Crash-safe training checkpoints on top of `Accelerator.save_state` / `load_state`.

A checkpoint is written into ``checkpoints/.tmp-checkpoint-<step>`` and renamed to ``checkpoints/checkpoint-<step>``
only once every process has finished writing, so a folder named ``checkpoint-*`` is always complete: a crash (even
``kill -9``) during a write leaves the previous checkpoints untouched and a ``.tmp-*`` folder that the next save or
resume removes. Besides the model, optimizer, LR scheduler, RNG states and registered objects (EMA) saved by
Accelerate, every checkpoint holds a `TrainingProgress`: the step and the position in the data.
"""

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import SAFE_WEIGHTS_NAME

from scldm_hf.errors import CheckpointError

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_PREFIX = ".tmp-"
# Seconds to wait between writing a checkpoint and committing it (fault-injection for the crash tests).
WRITE_DELAY_ENV = "SCLDM_CHECKPOINT_WRITE_DELAY"


@dataclass
class TrainingProgress:
    """Where training stands; registered with `Accelerator.register_for_checkpointing`.

    ``epoch`` and ``batches_seen_in_epoch`` (micro-batches per process) locate the next batch: the sampler order of
    an epoch is a function of (seed, epoch), so resuming skips ``batches_seen_in_epoch`` batches of that epoch.
    """

    global_step: int = 0
    epoch: int = 0
    batches_seen_in_epoch: int = 0
    num_processes: int = 1
    total_batch_size: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class GeneratorState:
    """Checkpoint adapter for a `torch.Generator` (e.g. the collator's gene-subsampling RNG)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng_state"])


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


def save_checkpoint(accelerator: Accelerator, checkpoint_root: str | Path, step: int, total_limit: int) -> Path:
    """Atomically write ``checkpoint-<step>`` (all processes must call this), then keep the newest `total_limit`."""
    root = Path(checkpoint_root)
    final = root / f"checkpoint-{step}"
    temporary = root / f"{TEMPORARY_PREFIX}{final.name}"
    if accelerator.is_main_process:
        remove_incomplete_checkpoints(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
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


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    """`Accelerator.load_state` with an error that says which checkpoint is broken and what to do."""
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} could not be restored ({type(error).__name__}: {error}); it does not match this "
            "model/configuration or is damaged. Resume with the same config, or delete it to fall back to an older one."
        ) from error


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
