"""Model ids ("org/name") resolved offline through the local Hugging Face cache.

`from_pretrained("org/name", revision=..., local_files_only=True)` reads a model that an
earlier download left in the HF cache; `resolve` finds the same directory, with
`huggingface_hub.snapshot_download(..., local_files_only=True)` (no network, ever).

The cache (huggingface_hub's layout, https://huggingface.co/docs/huggingface_hub/guides/manage-cache):

    $HF_HUB_CACHE/models--org--name/
        blobs/<sha256 or git sha>          the files' bytes
        refs/main                          the commit hash a branch or tag points to
        snapshots/<commit hash>/config.json -> ../../blobs/...   one folder per commit

The cache folder is read from the environment at each call, as huggingface_hub computes it
at import: HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, HF_HOME
defaulting to $XDG_CACHE_HOME/huggingface, i.e. ~/.cache/huggingface. (Reading it per call
lets a test or a caller change the cache after import.)
"""

from __future__ import annotations

import os

# A revision of 40 hex digits is a commit (a snapshot folder); anything else is a branch or
# tag name looked up in refs/, as `from_pretrained` does. No revision means "main".
DEFAULT_REVISION = "main"


class ModelNotFoundError(FileNotFoundError):
    """A checkpoint that is neither a directory nor a model id in the local HF cache."""


def cache_dir() -> str:
    """The HF hub cache folder huggingface_hub would use with the current environment."""
    expand = lambda p: os.path.expandvars(os.path.expanduser(p))  # noqa: E731
    home = expand(os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"))
    return expand(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                  or os.path.join(home, "hub"))


def is_model_id(name: str) -> bool:
    """Whether `name` can be a hub model id ("name" or "org/name"), as huggingface_hub validates it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve(checkpoint: str | os.PathLike, revision: str | None = None) -> str:
    """The directory to load: `checkpoint` itself when that path exists (a path always wins,
    as in `from_pretrained`), else the cached snapshot of model id `checkpoint` at `revision`
    (a branch, tag or commit hash; default "main").

    Raises ModelNotFoundError (a FileNotFoundError) naming the id, the revision and the
    cache searched; ValueError for a revision given with a local directory (it would be ignored).
    """
    path = os.fspath(checkpoint)
    if os.path.exists(path):
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to model ids in the HF cache; {path!r} is a local "
                             "path (remove the revision, or the local path)")
        return path
    if not is_model_id(path):  # a path that is not there, e.g. /no/such/dir: the plain error
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = revision or DEFAULT_REVISION
    cache = cache_dir()
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{path!r} is not a directory, and the local HF cache {cache!r} has no model {path!r} at revision "
            f"{revision!r}{_cached_revisions(cache, path)} (HF_HUB_CACHE or HF_HOME choose the cache; refjax "
            f"never downloads: fetch it first, e.g. `hf download {path} --revision {revision}`)") from None


def _cached_revisions(cache: str, model_id: str) -> str:
    """What the cache holds of `model_id`, for the not-found message: its refs and snapshots."""
    folder = os.path.join(cache, "models--" + model_id.replace("/", "--"))
    refs, snapshots = (sorted(os.listdir(os.path.join(folder, sub))) if os.path.isdir(os.path.join(folder, sub))
                       else [] for sub in ("refs", "snapshots"))
    if not refs and not snapshots:
        return ""
    return f" (cached: refs {', '.join(refs) or 'none'}; snapshots {', '.join(s[:12] for s in snapshots) or 'none'})"
