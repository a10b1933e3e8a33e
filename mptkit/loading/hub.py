"""A model by its hub name (`mosaicml/mpt-7b-instruct`, `org/name@revision`): resolved to a commit and
read from huggingface_hub's standard cache, downloading only what mptkit reads.

What is fetched: config.json, the tokenizer files and one weights format (safetensors where the repo
has them, else the `.bin` files), never the repository's Python files. A repo already in the cache
is read without the network; `HF_HUB_OFFLINE=1` reads only the cache. The environment is read when a
name is resolved (not when huggingface_hub was imported): HF_HOME / HF_HUB_CACHE (where), HF_ENDPOINT
(which hub), HF_TOKEN (private and gated repos). Failures are one line each: not cached while offline,
no such repo (or private without a token), no such revision, not an MPT model, not enough disk.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .sources import HFDirectory

_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:@[\w./-]+)?$")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# One weights format: the first whose files the repo has (an index names its shards).
WEIGHT_FORMATS = (("model.safetensors.index.json", "*.safetensors"), ("model.safetensors", None),
                  ("pytorch_model.bin.index.json", "pytorch_model-*.bin"), ("pytorch_model.bin", None))
_DISK_MARGIN = 1.02  # free space asked beyond the files' sizes


class HubError(FileNotFoundError):
    """A hub name that cannot be read, in one line."""


def is_hub_name(text: str) -> bool:
    return bool(_NAME.match(text))


@dataclass(frozen=True)
class HubRepo(HFDirectory):
    """An HF-format snapshot of a hub repository, pinned to the commit it resolved to."""

    repo_id: str = ""
    commit: str = ""
    description: ClassVar[str] = "a hub repository"

    @property
    def reference(self) -> str:
        """The name with its commit: what was read stays what is read (resume, exports, adapters)."""
        return f"{self.repo_id}@{self.commit}"

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1]


def _environment() -> dict:
    """huggingface_hub's settings as the environment says now."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return {
        "cache_dir": os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"),
        "endpoint": os.environ.get("HF_ENDPOINT") or None,
        "token": os.environ.get("HF_TOKEN") or None,
        "offline": os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true"),
    }


def split_name(name: str, revision: str | None) -> tuple[str, str | None]:
    repo_id, _, pinned = name.partition("@")
    if pinned and revision is not None and pinned != revision:
        raise HubError(f"{name}: names revision {pinned!r} and --revision {revision!r}; give one")
    return repo_id, pinned or revision


def files_to_fetch(repo_files: list[str]) -> list[str]:
    """Of a repo's files, what mptkit reads: config, tokenizer, one weights format ([]: no model)."""
    wanted = [f for f in repo_files if f in CONFIG_FILES or f in TOKENIZER_FILES]
    for marker, shards in WEIGHT_FORMATS:
        if marker in repo_files and "config.json" in repo_files:
            return wanted + [marker] + [f for f in repo_files if shards and fnmatch.fnmatch(f, shards)]
    return []  # not a model mptkit can read


def resolve_hub_repo(name: str, revision: str | None = None) -> HubRepo:
    """`org/name[@revision]` as a pinned snapshot directory in the cache, downloaded if need be."""
    repo_id, revision = split_name(name, revision)
    formats = [[*CONFIG_FILES, *TOKENIZER_FILES, marker, *([shards] if shards else [])]
               for marker, shards in WEIGHT_FORMATS]
    snapshot = _snapshot(name, repo_id, revision, files_to_fetch, formats, _has_model_files)
    repo = HubRepo(path=snapshot, repo_id=repo_id, commit=snapshot.name)
    model_type = repo.config_fields().get("model_type")
    if model_type != "mpt":
        raise HubError(f"{name}: a {model_type or 'non-transformers'} model (config.json model_type), not MPT; "
                       "mptkit reads MPT models")
    return repo


def fetch_hub_adapter(name: str) -> Path:
    """A PEFT adapter repository `org/name[@revision]`: its adapter files, from the cache or downloaded."""
    from mptkit.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_IDENTITY

    files = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_IDENTITY)
    repo_id, revision = split_name(name, None)
    return _snapshot(name, repo_id, revision, lambda listed: [f for f in listed if f in files], [list(files)],
                     lambda present: {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= present)


def _has_model_files(present: set[str]) -> bool:
    return "config.json" in present and any(marker in present for marker, _ in WEIGHT_FORMATS)


def _snapshot(name: str, repo_id: str, revision: str | None, choose, pattern_sets, complete) -> Path:
    """The snapshot directory of the revision: the cache's when it holds one of `pattern_sets` whole and
    `complete(its files)`, else downloaded with only the files `choose(the repo's files)` picks."""
    env = _environment()
    try:
        for patterns in pattern_sets:
            cached = _cached_snapshot(repo_id, revision, env, patterns)
            if cached is not None and complete({p.name for p in cached.iterdir()}):
                return cached
        if env["offline"]:
            raise HubError(f"{name}: not in the hub cache ({env['cache_dir']}), and HF_HUB_OFFLINE is set")
        return _download(repo_id, revision, env, choose)
    except HubError:
        raise
    except Exception as exc:
        raise _as_hub_error(name, revision, env, exc) from None


def _cached_snapshot(repo_id: str, revision: str | None, env: dict, patterns: list[str]) -> Path | None:
    """The cached snapshot when it holds every file of the repo that `patterns` match (huggingface_hub
    knows the repo's file list from the download) or, for a cache it did not fill, whatever it holds."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=env["cache_dir"], local_files_only=True,
                                      allow_patterns=patterns))
    except LocalEntryNotFoundError:
        return None


def _download(repo_id: str, revision: str | None, env: dict, choose) -> Path:
    """Resolve the revision to its commit, check the disk, fetch the chosen files (with progress bars)."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=env["endpoint"], token=env["token"])
    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or ()}
    wanted = choose(list(sizes))
    if not wanted:
        raise HubError(f"{repo_id}: the repository has none of the files mptkit reads (config.json and weights, "
                       "or a PEFT adapter)")
    _check_disk(repo_id, env["cache_dir"], sum(sizes[f] for f in wanted))
    # by the revision asked (not info.sha): the cache then records the branch, so that the name is read
    # offline later; the snapshot directory is named by the commit actually fetched
    return Path(snapshot_download(repo_id, revision=revision, cache_dir=env["cache_dir"], endpoint=env["endpoint"],
                                  token=env["token"], allow_patterns=wanted))


def _check_disk(repo_id: str, cache_dir: str, needed: int) -> None:
    """Enough free space for the files (those already in the cache count too: a conservative check)."""
    where = Path(cache_dir)
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < needed * _DISK_MARGIN:
        raise HubError(f"{repo_id}: needs {_size(needed)} in {where}, which has {_size(free)} free; "
                       "free some space or point HF_HUB_CACHE at a larger disk")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _as_hub_error(name: str, revision: str | None, env: dict, exc: Exception) -> HubError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{name}: the hub repository has no revision {revision!r}")
    if isinstance(exc, GatedRepoError):
        return HubError(f"{name}: a gated repository; accept its terms on the hub and set HF_TOKEN")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RepositoryNotFoundError) or status in (401, 403, 404):
        token = "" if env["token"] else " (if it is private, set HF_TOKEN)"
        return HubError(f"{name}: no such model on the hub{token}")
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    hub = env["endpoint"] or "the hub"
    return HubError(f"{name}: not in the hub cache ({env['cache_dir']}) and {hub} cannot be reached "
                    f"({type(exc).__name__}: {first_line})")
