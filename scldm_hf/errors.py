"""Exceptions raised by scldm-hf.

Every message names the problem, where it is (cells, genes, column, file) and how to fix it.
The CLI turns any ``SCLDMError`` into a one-line message and a non-zero exit code.
"""

import typing


class SCLDMError(Exception):
    """Base class of every error scldm-hf raises on purpose."""


class InputDataError(SCLDMError, ValueError):
    """The expression matrix or its annotations cannot be used as given (counts, NaNs, empty cells...)."""


class VocabularyError(SCLDMError, ValueError):
    """Genes do not match the model's gene vocabulary well enough."""


class ConditionError(SCLDMError, ValueError):
    """A covariate column or label is missing or unknown to the model."""


class CheckpointError(SCLDMError, OSError):
    """A saved model, pipeline or training checkpoint is missing, truncated or inconsistent."""


class ConfigurationError(SCLDMError, ValueError):
    """Arguments or configuration values that cannot work together."""


def check_choice(name: str, value, choices) -> None:
    """Raise a `ConfigurationError` naming option `name` unless `value` is one of the values of `choices`, a
    `typing.Literal` (as annotated on the option)."""
    allowed = typing.get_args(choices)
    if value not in allowed:
        raise ConfigurationError(f"{name}={value!r} is not one of {allowed}.")
