"""Checked loading of saved models: every broken folder is a ``CheckpointError`` naming the file and the fix.

``from_pretrained`` of transformers/diffusers reports a truncated weights file, a missing pipeline component or a
config that does not fit the weights with raw ``SafetensorError``/``OSError``/``RuntimeError`` messages (or, for a
pipeline folder that does not exist, an ``AttributeError``). The functions here check the folder first, reading
only the safetensors headers (tensor names and shapes), and then call ``from_pretrained``.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME

from .data.hub import hub_snapshot, looks_like_local_path
from .data.vocab import VOCAB_FILE_NAME, GeneVocab
from .errors import CheckpointError

PIPELINE_INDEX_NAME = "model_index.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_RESAVE_FIX = "re-download the model, or re-save it with save_pretrained"
_MAX_LISTED = 3


def resolve_model_path(name_or_path: str | PathLike, local_files_only: bool = False, revision: str | None = None) -> Path:
    """A local folder, or the Hub snapshot folder of a repo id at `revision` (branch, tag or commit; default the
    default branch), from the cache when offline. A path-like name that is not a folder raises."""
    path = Path(name_or_path)
    if looks_like_local_path(name_or_path):
        if not path.is_dir():
            raise CheckpointError(
                f"No model folder at {path}: pass the folder written by save_pretrained (or a Hub repo id)."
            )
        return path
    return hub_snapshot(str(name_or_path), "model", revision, local_files_only, error=CheckpointError,
                        fix="pass the folder of a saved model")


def read_json_file(path: str | PathLike) -> dict:
    """The JSON object of a config file (``config.json``, ``model_index.json``, ...); a missing, empty, malformed or
    non-object file raises ``CheckpointError``."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(
            f"{path} is not a valid JSON file ({type(error).__name__}: {error}): the save was interrupted or the file "
            f"was edited; {_RESAVE_FIX}."
        ) from error
    if not isinstance(values, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(values).__name__}, not an object of settings: the file was edited; {_RESAVE_FIX}."
        )
    return values


def check_safetensors_file(path: str | PathLike) -> dict[str, tuple[int, ...]]:
    """Read the header of a ``.safetensors`` file -> ``{tensor name: shape}``; a missing, truncated or corrupted
    file raises ``CheckpointError``. Tensor data is not loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weights file {path} is missing: {_RESAVE_FIX}.")
    try:
        with safe_open(str(path), framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except SafetensorError as error:
        raise CheckpointError(
            f"Weights file {path} is truncated or corrupted ({error}): {_RESAVE_FIX}."
        ) from error


def _weight_shapes(folder: Path, weights_name: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a model folder's safetensors weights, single file or sharded (``<name>.index.json``)."""
    index = folder / f"{weights_name}.index.json"
    if not (folder / weights_name).is_file() and index.is_file():
        shards = sorted(set(read_json_file(index).get("weight_map", {}).values()))
        return {name: shape for shard in shards for name, shape in check_safetensors_file(folder / shard).items()}
    pickled = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickled and not (folder / weights_name).is_file():
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}), which can run code when loaded: only "
            f"safetensors weights ({weights_name}) are loaded; convert them with "
            "save_pretrained(safe_serialization=True)."
        )
    return check_safetensors_file(folder / weights_name)


def check_model_folder(path: str | PathLike, required: Sequence[str] = (CONFIG_NAME,)) -> Path:
    """Check that ``path`` is a folder holding every file or sub-folder named in ``required``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"No model folder at {path}: pass the folder written by save_pretrained.")
    missing = [name for name in required if not (path / name).exists()]
    if missing:
        raise CheckpointError(
            f"The model folder {path} lacks {', '.join(map(repr, missing))}: the save was incomplete or the folder "
            f"was edited; {_RESAVE_FIX}."
        )
    return path


def check_weights_match_config(model_class, folder: str | PathLike, weights_name: str) -> None:
    """Check that the weights in ``folder`` have the tensors and shapes ``model_class`` builds from its config.

    ``model_class`` is a transformers ``PreTrainedModel`` or a diffusers ``ModelMixin``; the model is built on the
    meta device (no memory, no initialisation) only to read its parameter shapes.
    """
    folder = check_model_folder(folder, required=(CONFIG_NAME,))
    read_json_file(folder / CONFIG_NAME)
    found = _weight_shapes(folder, weights_name)
    with torch.device("meta"):
        if issubclass(model_class, PreTrainedModel):
            model = model_class(model_class.config_class.from_pretrained(folder))
        else:
            model = model_class.from_config(model_class.load_config(folder))
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    other_shape = [name for name in expected if name in found and found[name] != expected[name]]
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if other_shape or missing or unexpected:
        problems = [
            f"{len(names)} {what} (e.g. {', '.join(detail(name) for name in names[:_MAX_LISTED])})"
            for names, what, detail in (
                (other_shape, "tensors of another shape", lambda n: f"{n!r} {list(found[n])} vs {list(expected[n])}"),
                (missing, "tensors missing from the weights", repr),
                (unexpected, "tensors the config does not build", repr),
            )
            if names
        ]
        raise CheckpointError(
            f"The weights {folder / weights_name} do not match {folder / CONFIG_NAME} ({'; '.join(problems)}; shapes "
            "given as weights vs config): the config was edited or belongs to other weights. Restore the config "
            "saved with these weights."
        )


def load_vae(name_or_path: str | PathLike, local_files_only: bool = False, revision: str | None = None, **kwargs):
    """``SCVAEModel.from_pretrained`` after checking the folder, its weights file and their shapes."""
    from .models.modeling_scvae import SCVAEModel

    folder = resolve_model_path(name_or_path, local_files_only, revision)
    check_weights_match_config(SCVAEModel, folder, SAFE_WEIGHTS_NAME)
    return SCVAEModel.from_pretrained(str(folder), **kwargs)


def _pipeline_components() -> dict[str, tuple[type | None, str, str | None]]:
    """``{component: (model class or None, config file, weights file or None)}`` of an ``SCLDMPipeline`` folder."""
    from .models.conditioning import CellConditioner
    from .models.modeling_scvae import SCVAEModel
    from .models.transformer_latent_dit import LatentDiTTransformer

    return {
        "vae": (SCVAEModel, CONFIG_NAME, SAFE_WEIGHTS_NAME),
        "transformer": (LatentDiTTransformer, CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME),
        "conditioner": (CellConditioner, CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME),
        "scheduler": (None, SCHEDULER_CONFIG_NAME, None),
    }


def _check_pipeline_index(folder: Path) -> None:
    """``model_index.json`` names each component as a ``[library, class]`` pair of a class SCLDMPipeline loads."""
    from .pipelines.pipeline_scldm import SCLDMPipeline

    index_path = folder / PIPELINE_INDEX_NAME
    index = read_json_file(index_path)
    schedulers = typing.get_args(inspect.signature(SCLDMPipeline.__init__).parameters["scheduler"].annotation)
    for component, (model_class, _, _) in _pipeline_components().items():
        accepted = [cls.__name__ for cls in ([model_class] if model_class else schedulers)]
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in accepted):
            raise CheckpointError(
                f"{index_path} names the {component!r} component {entry!r}; an SCLDMPipeline {component} is "
                f"[library, class] with class one of {accepted}: restore the {PIPELINE_INDEX_NAME} saved with the "
                f"pipeline, or {_RESAVE_FIX}."
            )


def check_pipeline_folder(path: str | PathLike) -> Path:
    """Check a saved ``SCLDMPipeline`` folder: ``model_index.json`` and the classes it names, every component's
    config and safetensors weights, and that each model's weights fit its config."""
    folder = check_model_folder(path, required=(PIPELINE_INDEX_NAME,))
    _check_pipeline_index(folder)
    for component, (model_class, config_name, weights_name) in _pipeline_components().items():
        component_folder = folder / component
        if not (component_folder / config_name).is_file():
            raise CheckpointError(
                f"The pipeline folder {folder} has no {component!r} component ({component_folder / config_name} is "
                f"missing): an SCLDMPipeline needs vae, transformer, scheduler and conditioner; {_RESAVE_FIX} "
                "(pipe.save_pretrained(folder))."
            )
        if model_class is None:
            read_json_file(component_folder / config_name)
        else:
            check_weights_match_config(model_class, component_folder, weights_name)
    return folder


def load_pipeline(name_or_path: str | PathLike, local_files_only: bool = False, revision: str | None = None,
                  **kwargs):
    """``SCLDMPipeline.from_pretrained`` after :func:`check_pipeline_folder`; `revision` as in
    :func:`resolve_model_path`."""
    from .pipelines.pipeline_scldm import SCLDMPipeline

    folder = check_pipeline_folder(resolve_model_path(name_or_path, local_files_only, revision))
    return SCLDMPipeline.from_pretrained(str(folder), **kwargs)


def load_gene_vocab(path: str | PathLike) -> GeneVocab:
    """The gene vocabulary of a ``gene_vocab.json`` file, a folder holding one, a saved VAE or a saved pipeline."""
    path = Path(path)
    for config_path in (path / CONFIG_NAME, path / "vae" / CONFIG_NAME):
        if config_path.is_file():
            genes = read_json_file(config_path).get("gene_names")
            if genes:
                return GeneVocab(genes)
    if path.is_file() or (path / VOCAB_FILE_NAME).is_file():
        vocab_path = path if path.is_file() else path / VOCAB_FILE_NAME
        genes = read_json_file(vocab_path).get("genes")
        if not isinstance(genes, list) or not genes:
            raise CheckpointError(
                f"{vocab_path} has no list of gene names under \"genes\": pass a {VOCAB_FILE_NAME} written by "
                "GeneVocab.save, or a saved VAE or pipeline folder."
            )
        return GeneVocab(genes)
    raise CheckpointError(
        f"No gene vocabulary at {path}: pass a {VOCAB_FILE_NAME} file, a folder holding one, or a saved VAE or "
        "pipeline folder."
    )
