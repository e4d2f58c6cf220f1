"""Expected failures -> one line that names the file or setting and the way out.

:func:`describe_error` knows the failure classes users meet (bad settings, files, disk, devices,
the Elasticsearch server, refused checkpoints); anything else is a bug and gets ``None``.
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
from pathlib import Path

from ..index import IndexBackendError
from ..index.elasticsearch import BulkIndexError
from ..redact import known_secrets, redact_text
from ._common import error_types

# Settings that name folders vrec writes into, with their flags.
_PATH_SETTINGS = (("out", "--out"), ("workdir", "--workdir"))
# What an HTTP status from Elasticsearch means for the user, and the way out.
_ES_HINTS = {
    401: "the server refused the credentials; set VREC_ES_API_KEY, or VREC_ES_USER and VREC_ES_PASSWORD",
    403: "the API key or user lacks privileges on the vrec index (read, write, manage)",
    404: "not found: VREC_ES_URL must be the server's root address (http(s)://host:9200) and the index must exist "
    "(`vrec index --backend elasticsearch` creates it)",
    408: "the request timed out; rerun, or give the server more resources",
    429: "the server is overloaded (too many requests); wait a moment and rerun",
    502: "a proxy in front of the server could not reach it; check the server and rerun",
    503: "the server is not ready (still starting, or the cluster has no master / red health); "
    "wait until `curl <VREC_ES_URL>/_cluster/health` answers green or yellow and rerun",
    504: "a proxy in front of the server timed out; rerun",
}


def one_line(text: object) -> str:
    """``text`` on one line, with every known secret masked."""
    return redact_text(" ".join(str(text).split()), known_secrets())


def describe_error(exc: BaseException, args: argparse.Namespace | None = None) -> str | None:
    """The user-facing line for an expected failure, or None for a bug (unexpected exception)."""
    for kind, describe in _DESCRIBERS:
        if isinstance(exc, kind()):
            return describe(exc, args)
    return None


def _es_types() -> tuple[type[BaseException], ...]:
    try:
        import elastic_transport
        from elasticsearch import ApiError
    except ImportError:
        return ()
    return (ApiError, elastic_transport.TransportError)


def _es_error(exc: BaseException, args: argparse.Namespace | None) -> str:
    """An Elasticsearch failure that reached the command line without a vrec message."""
    meta = getattr(exc, "meta", None)
    node = getattr(meta, "node", None)
    where = f"{node.scheme}://{node.host}:{node.port}" if node is not None else "the Elasticsearch server (VREC_ES_URL)"
    status = getattr(meta, "status", None)
    if not isinstance(status, int):
        # transport level: refused, DNS, timeout, TLS
        return f"cannot reach Elasticsearch at {where} ({one_line(exc)}); check VREC_ES_URL or start the server (`docker compose up -d elasticsearch`)"
    reason = one_line(getattr(exc, "message", "") or exc)[:200]
    hint = _ES_HINTS.get(status, f"{reason}; see the server's log")
    return f"Elasticsearch at {where} answered HTTP {status}: {hint}"


def _setting_for(path: str | None, args: argparse.Namespace | None) -> str:
    """Which --out / --workdir the failing path lies in, as advice (empty if none)."""
    if not path or args is None:
        return ""
    target = Path(os.path.abspath(path))
    for name, flag in _PATH_SETTINGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        folder = Path(os.path.abspath(Path(value).expanduser()))
        if target == folder or folder in target.parents:
            return flag
    return ""


def _os_error(exc: BaseException, args: argparse.Namespace | None) -> str:
    assert isinstance(exc, OSError)
    if exc.errno is None:  # raised with its own message
        return one_line(exc)
    flag = _setting_for(exc.filename, args)
    if not flag and not exc.filename:  # e.g. a write() on an open file: blame the folder settings given
        flag = next((f for name, f in _PATH_SETTINGS if getattr(args, name, None) is not None), "")
    what = repr(str(exc.filename)) if exc.filename else f"{flag} {str(getattr(args, flag[2:]))!r}" if flag else "a file"
    elsewhere = f"point {flag} elsewhere" if flag else "choose another path"
    advice = {
        errno.ENOSPC: f"no space left on the device writing {what}; free some space or {elsewhere} "
        "(a rerun resumes from what is cached)",
        errno.EDQUOT: f"disk quota exceeded writing {what}; free some space or {elsewhere}",
        errno.ENOTDIR: f"{what}: a part of this path is a file, not a folder; {elsewhere}",
        errno.EISDIR: f"{what} is a folder where a file was expected; {elsewhere}",
        errno.EACCES: f"permission denied on {what}; {elsewhere} or fix its permissions",
        errno.EPERM: f"operation not permitted on {what}; {elsewhere} or fix its permissions",
        errno.EEXIST: f"{what} already exists; remove it or {elsewhere}",
        errno.EROFS: f"{what} is on a read-only file system; {elsewhere}",
        errno.ENOENT: f"{what} does not exist",
    }
    text = advice.get(exc.errno)
    if text is None:
        text = f"{exc.strerror or os.strerror(exc.errno)}: {what}" + (f"; {elsewhere}" if flag else "")
    return one_line(text)


def _untrusted(exc: BaseException, args: argparse.Namespace | None) -> str:
    # A refusal vrec did not wrap (e.g. inside a third-party loader): name the file settings.
    flags = [f for name, f in (("weights", "--weights"), ("out", "--out")) if getattr(args, name, None)]
    where = f" given by {' or '.join(flags)}" if flags else ""
    return (
        f"a weights or checkpoint file{where} is not a trusted vrec checkpoint (vrec loads tensors only, never "
        "pickled objects, which could run code); use the original file, or recreate it with the vrec command that wrote it"
    )


def _plain(exc: BaseException, args: argparse.Namespace | None) -> str:
    return one_line(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)


def _vrec_types() -> tuple[type[BaseException], ...]:
    from ..models.base import UntrustedFileError  # imports torch: not at `import vrec_utils.cli`

    # IndexBackendError: server unavailable (also an OSError), index not found, other settings
    return (*error_types(), IndexBackendError, BulkIndexError, UntrustedFileError)


# Order matters: vrec's own errors first (BackendUnavailableError, an IndexBackendError, is an OSError; UntrustedFileError a
# ValueError), then files and the server, then refusals that were not wrapped.
_DESCRIBERS = (
    (_vrec_types, lambda exc, args: _os_error(exc, args) if isinstance(exc, OSError) else _plain(exc, args)),
    (lambda: (OSError,), _os_error),
    (_es_types, _es_error),
    (lambda: (pickle.UnpicklingError,), _untrusted),
)

