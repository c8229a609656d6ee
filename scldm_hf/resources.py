"""Files shipped beside the code: model card templates (``model_cards/``) and training recipes (``training/configs/``).

In the source tree they live in those top-level folders; a wheel carries them as package data under
``scldm_hf/model_cards`` and ``scldm_hf/recipes`` (``[tool.setuptools]`` in pyproject.toml maps the folders).
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_DIRS = {"model_cards": "model_cards", "recipes": "training/configs"}


def resource_dir(name: str) -> Path:
    """The folder of `name` (``"model_cards"`` or ``"recipes"``) in an installed wheel, else in the source tree."""
    installed = _PACKAGE_DIR / name
    return installed if installed.is_dir() else _PACKAGE_DIR.parent / _SOURCE_DIRS[name]
