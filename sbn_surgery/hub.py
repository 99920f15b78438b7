"""Weights by name, from the Hugging Face Hub's local cache, downloaded only when asked for.

Files are found as ``huggingface_hub.hf_hub_download`` finds them (the cache layout
``models--ORG--NAME/snapshots/REV/FILE`` with ``refs/main``), with the Hub's own environment read
at the time of the call, not at import: ``HF_HUB_CACHE`` (else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``), ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN``.

* The cache comes first: a file found there is used without any network access (timm's weights
  under a tag do not change; ask for another revision with ``hf-hub:ORG/NAME@REV``).
* ``model.safetensors`` is preferred to ``pytorch_model.bin`` (read later with
  ``torch.load(weights_only=True)``), as timm prefers it.
* A download happens only when the caller allows one (``download=True``: the user asked, with
  ``--pretrained`` or ``--checkpoint hf-hub:...``) and ``HF_HUB_OFFLINE`` is not set. Before it,
  one request with a short timeout checks that the Hub answers, so an unreachable Hub is one
  error within seconds, not huggingface_hub's retries (about 25 s).
* A timm model whose weights have no Hub repository (a few older ones) is fetched from its URL
  into torch's hub cache (``TORCH_HOME``), under the same rules.

Every failure is a :class:`CheckpointError` naming the model, the cache folder looked in and the
ways out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

from .errors import CheckpointError

__all__ = ["HUB_PREFIX", "HubFiles", "is_hub_id", "parse_hub_id", "cache_dir", "is_offline",
           "fetch_repo", "fetch_url"]

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
#: Seconds the one reachability check waits for the Hub (or a weights URL) to answer.
PROBE_TIMEOUT_S = 5.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}"
                      r"(@[A-Za-z0-9_.\-/]{1,100})?$")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass
class HubFiles:
    """Local paths of a repository's files: the weights, and its config.json if asked for and
    present."""

    weights: Path
    config: Optional[Path]
    repo: str


def is_hub_id(value: object) -> bool:
    return isinstance(value, (str, os.PathLike)) and str(value).startswith(HUB_PREFIX)


def parse_hub_id(value: str) -> tuple[str, Optional[str]]:
    """``hf-hub:ORG/NAME[@REV]`` -> (``ORG/NAME``, ``REV`` or None)."""
    text = str(value)[len(HUB_PREFIX):] if is_hub_id(value) else str(value)
    if not _REPO_ID.match(text) or ".." in text or "--" in text:
        raise CheckpointError(f"--checkpoint {str(value)[:120]!r} is not a Hugging Face Hub "
                              "repository: write hf-hub:ORG/NAME (optionally @REVISION), e.g. "
                              "hf-hub:timm/resnet18.a1_in1k")
    repo, _, rev = text.partition("@")
    return repo, rev or None


def cache_dir() -> Path:
    """The Hub cache folder, by huggingface_hub's rules, from the environment now."""
    env = os.environ.get
    folder = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env("HF_HOME") or os.path.join(
            env("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """huggingface_hub's retry warnings off the terminal: failures come back as one error."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _ways_out(kind: str) -> str:
    """The two ways out of weights that are not in the cache: ``kind`` says why they are not
    downloaded now (offline, unreachable, not_asked)."""
    first = {
        "offline": "download them once where a network exists (the same command without "
                   "HF_HUB_OFFLINE fills the cache)",
        "unreachable": "download them once where a network exists (the same command there "
                       "fills the cache; copy the cache folder here)",
        "not_asked": "download them once by giving --pretrained (or --checkpoint hf-hub:...) "
                     "on the command line, where a network exists",
    }[kind]
    return f"{first}, or give a weights file with --checkpoint FILE"


def _cached(repo: str, filename: str, revision: Optional[str], folder: Path) -> Optional[Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        with _quiet():
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=folder,
                                        local_files_only=True))
    except EntryNotFoundError:  # LocalEntryNotFoundError: not in the cache
        return None
    except ValueError as exc:  # huggingface_hub's check of the repository id
        raise CheckpointError(f"{repo!r} is not a Hugging Face Hub repository id ({exc})"
                              ) from None


def _probe(repo: str, filename: str, revision: Optional[str], what: str, folder: Path) -> bool:
    """One request, PROBE_TIMEOUT_S at most: True if ``filename`` exists, False if the Hub
    says it does not; a CheckpointError if the Hub cannot be reached or refuses the repo."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                       LocalEntryNotFoundError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    endpoint = os.environ.get("HF_ENDPOINT") or None
    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    where = f"looked in {folder / ('models--' + repo.replace('/', '--'))}"
    try:
        with _quiet():
            get_hf_file_metadata(url, timeout=PROBE_TIMEOUT_S)
        return True
    except GatedRepoError:
        raise CheckpointError(f"{what}: {repo} is a gated repository on the Hub: accept its "
                              "terms on its page and log in (`hf auth login`, or set HF_TOKEN)"
                              ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{what}: the Hub has no repository {repo} (or it is private: "
                              "log in with `hf auth login`, or set HF_TOKEN); check the name"
                              ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{what}: {repo} has no revision {revision!r}") from None
    except LocalEntryNotFoundError as exc:  # a subclass of the HTTP errors in older releases
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    except EntryNotFoundError:
        return False
    except HfHubHTTPError as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "HTTP error"
    except Exception as exc:  # noqa: BLE001 - connection refused, timeout, proxy, DNS ...
        reason = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
    raise CheckpointError(
        f"{what}: the weights are not in the Hugging Face cache ({where}) and the Hub "
        f"({endpoint or 'https://huggingface.co'}) cannot be reached ({reason}); "
        f"{_ways_out('unreachable')}")


def _download(repo: str, filename: str, revision: Optional[str], folder: Path,
              what: str) -> Optional[Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=folder,
                                    endpoint=os.environ.get("HF_ENDPOINT") or None))
    except LocalEntryNotFoundError as exc:  # the connection broke off after the check
        raise CheckpointError(f"{what}: downloading {filename} of {repo} failed "
                              f"({str(exc).strip()[:160]}); {_ways_out('unreachable')}"
                              ) from None
    except EntryNotFoundError:
        return None
    except OSError as exc:  # a full disk, an unwritable cache, an HTTP error
        raise CheckpointError(f"{what}: downloading {filename} of {repo} into {folder} failed "
                              f"({type(exc).__name__}: {str(exc).strip()[:160]})") from None


def fetch_repo(repo: str, revision: Optional[str] = None, *, what: str,
               files: tuple[str, ...] = WEIGHT_FILES, config: bool = False,
               download: bool = True) -> HubFiles:
    """The first of ``files`` the repository has, from the cache, else downloaded (see the
    module docstring); with ``config``, its config.json too where the cache or the download has
    one. ``what`` names the model in errors."""
    folder = cache_dir()
    found = next((p for p in (_cached(repo, f, revision, folder) for f in files) if p), None)
    if found is not None:  # the cache answers: no network, whatever the settings
        cfg = _cached(repo, CONFIG_FILE, revision, folder) if config else None
        return HubFiles(found, cfg, repo)
    if not download or is_offline():
        why = ("HF_HUB_OFFLINE is set" if download else
               "a download starts only from --pretrained or --checkpoint hf-hub:... given on the "
               "command line or as an argument, never from a file")
        raise CheckpointError(
            f"{what}: the weights are not in the Hugging Face cache (looked in "
            f"{folder / ('models--' + repo.replace('/', '--'))}) and {why}; "
            f"{_ways_out('offline' if download else 'not_asked')}")
    first = _probe(repo, files[0], revision, what, folder)  # the Hub answers, or one error
    for name in files[0 if first else 1:]:
        found = _download(repo, name, revision, folder, what)
        if found is not None:
            break
    if found is None:
        raise CheckpointError(f"{what}: the Hub repository {repo} holds none of "
                              f"{', '.join(files)}; it does not hold timm weights")
    cfg = _download(repo, CONFIG_FILE, revision, folder, what) if config else None
    return HubFiles(found, cfg, repo)


def fetch_url(url: str, *, what: str, download: bool = True) -> Path:
    """A timm weights URL (models without a Hub repository) in torch's hub cache, downloaded
    there when allowed (see the module docstring)."""
    import torch.hub

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / os.path.basename(urlparse(url).path)
    if target.is_file():
        return target
    if not download or is_offline():
        why = "HF_HUB_OFFLINE is set" if download else "a file cannot start a download"
        raise CheckpointError(f"{what}: the weights are not in torch's hub cache (looked for "
                              f"{target}) and {why}; "
                              f"{_ways_out('offline' if download else 'not_asked')}")
    try:
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=PROBE_TIMEOUT_S):
            pass
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what}: the weights are not in torch's hub cache ({target}) "
                              f"and {url} cannot be downloaded ({type(exc).__name__}: "
                              f"{str(exc).strip()[:160]}); {_ways_out('unreachable')}"
                              ) from None
    return target
