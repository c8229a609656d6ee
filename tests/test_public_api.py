"""Every name a package lists in ``__all__`` imports (`from scldm_hf import X` works for each)."""

import importlib
import pkgutil
import tomllib
from pathlib import Path

import pytest

import scldm_hf

PACKAGES = ["scldm_hf", *(f"scldm_hf.{module.name}" for module in pkgutil.iter_modules(scldm_hf.__path__)
                          if module.ispkg)]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_imports(package):
    module = importlib.import_module(package)
    assert module.__all__, f"{package} exports nothing"
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, f"{package}.__all__ names {missing}, which do not import"


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages explicitly (no top-level `pipelines`): a new sub-package must be added."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert set(PACKAGES) <= set(pyproject["tool"]["setuptools"]["packages"])
