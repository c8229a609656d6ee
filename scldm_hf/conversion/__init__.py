"""Conversion of checkpoints from other implementations (imported by the CLI only)."""

from .convert_original import convert_original_checkpoint
from .safe_pickle import load_plain_pickle

__all__ = ["convert_original_checkpoint", "load_plain_pickle"]
