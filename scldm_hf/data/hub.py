"""Corpora on the Hugging Face Hub: a corpus folder is pushed as a dataset repo as it is, and opened by repo id.

The repo holds the corpus folder unchanged (Arrow shards, ``corpus.json`` with the gene list and covariate labels,
``dataset_info.json``) plus a dataset card whose ``configs`` point ``datasets.load_dataset(repo_id)`` at the shards,
so the cells also load without this package. Repo ids resolve through ``huggingface_hub.snapshot_download``: from
the local Hugging Face cache when offline (``HF_HUB_OFFLINE=1``), at any branch, tag or commit.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, HfApi, snapshot_download
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import InputDataError, SCLDMError

CORPUS_CARD_TAGS = ["single-cell", "scRNA-seq", "biology", "scldm"]


def looks_like_local_path(name_or_path: str | PathLike) -> bool:
    """True for an existing path or one written as a path (absolute, ``./``, more than two parts): not a repo id."""
    path = Path(name_or_path)
    return path.exists() or path.is_absolute() or str(name_or_path).startswith(".") or len(path.parts) > 2


def hub_id(name_or_path: str | PathLike | None) -> str | None:
    """`name_or_path` if it names a Hub repo (``org/name``, not a local folder or file), else None."""
    if not name_or_path or looks_like_local_path(name_or_path):
        return None
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        return None
    return str(name_or_path) if str(name_or_path).count("/") == 1 else None


def hub_snapshot(repo_id: str, repo_type: str, revision: str | None = None, local_files_only: bool = False,
                 allow_patterns: list[str] | None = None, error: type[SCLDMError] = InputDataError,
                 fix: str = "pass a local folder") -> Path:
    """The snapshot folder of `repo_id` at `revision` (default branch when None), downloaded or from the cache.

    A repo or revision that is neither reachable nor cached raises `error` naming the repo and `fix`.
    """
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                      local_files_only=local_files_only, allow_patterns=allow_patterns))
    except (LocalEntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError, HFValidationError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        option = "" if repo_type == "model" else f" --repo-type {repo_type}"
        raise error(
            f"{repo_id!r}{at} is neither a local folder nor a Hub {repo_type} repo in the local cache ({exc}); "
            f"{fix}, or download the repo once with `hf download {repo_id}{option}`."
        ) from exc


def resolve_corpus_dir(name_or_path: str | PathLike, revision: str | None = None) -> Path:
    """A local corpus folder, or the snapshot folder of a Hub dataset repo id pushed by :func:`push_corpus_to_hub`."""
    if looks_like_local_path(name_or_path):
        return Path(name_or_path)
    return hub_snapshot(str(name_or_path), "dataset", revision,
                        fix="pass a corpus folder (scldm convert) or the id of a corpus pushed with push_corpus_to_hub")


def corpus_card(repo_id: str, info, shard_pattern: str) -> DatasetCard:
    """The dataset card (``README.md``) of the corpus `info` (a ``CorpusInfo``) pushed to `repo_id`: one ``train``
    split over the Arrow shards."""
    data = DatasetCardData(
        tags=CORPUS_CARD_TAGS,
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": shard_pattern}]}],
    )
    return DatasetCard(
        f"---\n{data.to_yaml()}\n---\n\n# {repo_id}\n\nAn scLDM cell corpus: {info.num_cells} cells x "
        f"{len(info.measured_gene_ids)} genes, one row per cell (sparse `gene_ids`, integer `counts`), covariates "
        f"{', '.join(info.covariates) or 'none'}; the gene list and covariate labels are in `corpus.json`.\n\n"
        f"```python\nfrom scldm_hf.data import load_corpus\n\ndataset, info = load_corpus(\"{repo_id}\")\n"
        f"# without scldm-hf: datasets.load_dataset(\"{repo_id}\", split=\"train\")\n```\n"
    )


def push_corpus_to_hub(corpus_dir: str | PathLike, repo_id: str, token: str | None = None, private: bool = False,
                       commit_message: str = "Upload scLDM corpus") -> str:
    """Upload a corpus folder (written by ``anndata_to_corpus``) as the dataset repo `repo_id`; returns its URL.

    The folder gains its dataset card ``README.md``, and the source recorded in ``corpus.json`` loses its local
    folders (only the file name is uploaded); the shards are uploaded as they are.
    """
    from .corpus import SHARD_GLOB, CorpusInfo  # corpus.py opens repo ids with this module

    corpus_dir = Path(corpus_dir)
    info = CorpusInfo.load(corpus_dir)
    if Path(info.source).is_absolute():
        info.source = Path(info.source).name
        info.save(corpus_dir)
    corpus_card(repo_id, info, SHARD_GLOB).save(corpus_dir / "README.md")
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(corpus_dir), repo_type="dataset",
                      ignore_patterns=[".*"], commit_message=commit_message)
    return str(repo_url)
