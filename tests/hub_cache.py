"""A Hugging Face cache filled the way downloads fill it, for offline loads by repo id (no network in tests).

`FakeHubApi` replaces `huggingface_hub.HfApi` where the package pushes: `upload_folder` commits the folder into
`<cache>/models--org--name/` (`datasets--org--name/` with `repo_type="dataset"`) as `snapshot_download` leaves a repo: content-addressed `blobs/`, `refs/<branch or tag>`,
`snapshots/<commit>/` of symlinks and the repo file listing `trees/<commit>.json` that huggingface_hub and diffusers
read offline. Only the network is replaced; every load through this cache is a real offline cache load.
"""

import hashlib
import os
from pathlib import Path

from huggingface_hub import RepoUrl, constants
from huggingface_hub._tree_cache import TreeCacheEntry, read_tree_cache, write_tree_cache
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

LFS_SUFFIXES = (".safetensors", ".arrow", ".parquet")


def use_offline_cache(monkeypatch, cache_dir: Path) -> None:
    """Point huggingface_hub (env vars and the constants already read from them) at `cache_dir`, offline."""
    for name, value in (("HF_HUB_CACHE", str(cache_dir)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, str(int(value)) if value is True else value)
        monkeypatch.setattr(constants, name, value)


def git_blob_id(content: bytes) -> str:
    """The git object id of a file: what the Hub reports as `blob_id` (and the etag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHubApi:
    """The part of `HfApi` the package uses to publish, committing into the local cache `cache_dir`."""

    def __init__(self, cache_dir: Path, token: str | None = None):
        self.cache_dir = Path(cache_dir)
        self.commits: list[tuple[str, str]] = []  # (repo_id, commit) in push order

    def storage(self, repo_id: str, repo_type: str | None) -> Path:
        return self.cache_dir / repo_folder_name(repo_id=repo_id, repo_type=repo_type or "model")

    def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False, repo_type: str | None = None,
                    **_) -> RepoUrl:
        storage = self.storage(repo_id, repo_type)
        if storage.exists() and not exist_ok:
            raise FileExistsError(f"{repo_id} exists")
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        prefix = "" if repo_type in (None, "model") else f"{repo_type}s/"
        return RepoUrl(f"{constants.ENDPOINT}/{prefix}{repo_id}")

    def upload_folder(self, repo_id: str, folder_path: str | Path, ignore_patterns: list[str] | None = None,
                      allow_patterns: list[str] | None = None, repo_type: str | None = None,
                      revision: str | None = None, commit_message: str = "", **_) -> str:
        """Commit the files of `folder_path` (minus `ignore_patterns`) on top of `revision` (default `main`)."""
        folder = Path(folder_path)
        storage = self.storage(repo_id, repo_type)
        branch = revision or constants.DEFAULT_REVISION
        paths = filter_repo_objects(
            sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()),
            allow_patterns=allow_patterns, ignore_patterns=[*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS],
        )
        entries = self.tree(repo_id, repo_type, branch)
        for path in paths:
            content = (folder / path).read_bytes()
            blob_id = git_blob_id(content)
            lfs = hashlib.sha256(content).hexdigest() if path.endswith(LFS_SUFFIXES) else None
            (storage / "blobs").mkdir(parents=True, exist_ok=True)
            (storage / "blobs" / (lfs or blob_id)).write_bytes(content)
            entries[path] = TreeCacheEntry(size=len(content), blob_id=blob_id, lfs_sha256=lfs,
                                           lfs_size=len(content) if lfs else None)
        commit = hashlib.sha1(
            "".join(f"{path}:{entry.blob_id}\n" for path, entry in sorted(entries.items())).encode()
            + commit_message.encode() + str(len(self.commits)).encode()
        ).hexdigest()
        snapshot = storage / "snapshots" / commit
        for path, entry in entries.items():
            link = snapshot / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(storage / "blobs" / (entry.lfs_sha256 or entry.blob_id), link.parent))
        write_tree_cache(str(storage), commit, entries)
        (storage / "refs" / branch).write_text(commit)
        self.commits.append((repo_id, commit))
        return commit

    def create_tag(self, repo_id: str, tag: str, revision: str | None = None, repo_type: str | None = None, **_):
        refs = self.storage(repo_id, repo_type) / "refs"
        (refs / tag).write_text((refs / (revision or constants.DEFAULT_REVISION)).read_text())

    def tree(self, repo_id: str, repo_type: str | None, revision: str) -> dict[str, TreeCacheEntry]:
        """The file entries of `revision` (empty for a new repo)."""
        ref = self.storage(repo_id, repo_type) / "refs" / revision
        if not ref.is_file():
            return {}
        return dict(read_tree_cache(str(ref.parents[1]), ref.read_text()))
