"""The package version, one fact: the installed distribution's (`pyproject.toml`'s `version`).

Standard library only: this module ships with a saved pipeline's code (see `hub_code`).
"""

import importlib.metadata


def package_version() -> str | None:
    """The installed scldm-hf version; None where the code runs without the package installed (a saved folder's
    code, or a source tree on `PYTHONPATH`)."""
    try:
        return importlib.metadata.version("scldm-hf")
    except importlib.metadata.PackageNotFoundError:
        return None
