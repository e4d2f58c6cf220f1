"""Image files by local path or URI: the one place that reads an image's bytes or its version.

A catalog's ``image`` may be a local path or a URI (``file://``, ``s3://``, ``gs://``, or any
protocol fsspec knows). Local paths are read with ``open``; URIs through fsspec. ``s3://`` and
``gs://`` use fsspec's own clients (s3fs, gcsfs) when they are installed, else pyarrow's S3 and GCS
filesystems (C++ SDKs, no botocore), wrapped by fsspec's ``ArrowFSWrapper``: ``vrec[cloud]``
installs pyarrow. Credentials and endpoints come from the standard environment: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL`` (an S3-compatible store), ``GOOGLE_APPLICATION_CREDENTIALS`` and
``STORAGE_EMULATOR_HOST`` (a GCS emulator such as fake-gcs-server: anonymous, its scheme and host).

A missing or unreadable object raises :class:`ImageSourceError` (extraction reports it in
``skipped.csv`` like an unreadable local file); a protocol whose package is missing raises
:class:`FilesystemUnavailableError` at once, with the install command.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
from urllib.parse import urlparse

import fsspec

CLOUD_INSTALL = "pip install 'vrec[cloud]'"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
#: fsspec protocols that pyarrow serves itself when fsspec's own client is not installed
_ARROW_PROTOCOLS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: fields of fsspec's ``info()`` that change when an object is rewritten, by filesystem
_VERSION_FIELDS = ("ETag", "etag", "generation", "VersionId", "LastModified", "updated", "mtime", "last_modified")


class ImageSourceError(OSError):
    """An image's bytes cannot be read (no such file or object, access denied, ...); ``str(exc)`` is the reason."""


class FilesystemUnavailableError(RuntimeError):
    """Image URIs of a protocol whose filesystem package is not installed; the message names the install command."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (a one-letter scheme would be a Windows drive, so two letters at least)."""
    return bool(_URI.match(str(path)))


def local_path(uri: str) -> str | None:
    """The local path a ``file://`` URI names, read as fsspec reads it (no percent-decoding);
    None for other URIs."""
    if not str(uri).lower().startswith("file://"):
        return None
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem._strip_protocol(str(uri))


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file or object."""
    if not is_uri(path):
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise ImageSourceError("file not found") from None
        except OSError as exc:
            raise ImageSourceError(f"cannot read: {exc.strerror or exc}") from None
    fs, key = filesystem(str(path))
    try:
        return fs.cat_file(key)
    except Exception as exc:  # noqa: BLE001 - each filesystem has its own errors; all mean "unreadable"
        raise ImageSourceError(_reason(exc)) from None


def version(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(size, change stamp)`` of a file or object, None when it cannot be read: a memo of
    content digests is valid while this is unchanged (local: size and mtime_ns; URIs: size and
    a hash of the ETag / generation / modification time the store reports)."""
    if not is_uri(path):
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns
    fs, key = filesystem(str(path))
    try:
        info = _arrow_info(fs, key) if _is_arrow(fs) else fs.info(key)
    except Exception:  # noqa: BLE001 - missing, denied, unreachable: unreadable either way
        return None
    if info.get("type") == "directory" or info.get("size") is None:
        return None
    stamp = json.dumps({f: info.get(f) for f in _VERSION_FIELDS if info.get(f) is not None}, sort_keys=True, default=str)
    return int(info["size"]), int.from_bytes(hashlib.blake2b(stamp.encode(), digest_size=8).digest(), "big", signed=True)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri``'s protocol (one per protocol and thread) and the path in it."""
    protocol = urlparse(uri).scheme.lower()
    fs = _filesystem(protocol, os.getpid(), threading.get_ident())
    return fs, uri.split("://", 1)[1] if _is_arrow(fs) else fs._strip_protocol(uri)


@functools.lru_cache(maxsize=64)
def _filesystem(protocol: str, _pid: int, _thread: int) -> fsspec.AbstractFileSystem:
    # one instance per process and thread: a forked DataLoader worker must not reuse its parent's
    # SDK client (network connections, event loops), nor digesting threads share one
    try:
        return fsspec.filesystem(protocol)
    except ImportError as exc:
        if protocol in _ARROW_PROTOCOLS:
            fs = _arrow_filesystem(_ARROW_PROTOCOLS[protocol])
            if fs is not None:
                return fs
        raise FilesystemUnavailableError(
            f"image paths starting {protocol}:// need a filesystem package that is not installed here ({exc}); "
            f"install it with: {CLOUD_INSTALL}"
        ) from None
    except ValueError as exc:  # fsspec: "Protocol not known"
        raise FilesystemUnavailableError(f"image paths starting {protocol}:// are not readable: {exc}") from None


def _arrow_filesystem(kind: str) -> fsspec.AbstractFileSystem | None:
    """pyarrow's S3 or GCS filesystem behind fsspec's interface; None when pyarrow is missing."""
    try:
        import pyarrow.fs as pafs  # optional extra (vrec[cloud]): only object-storage URIs need it
        from fsspec.implementations.arrow import ArrowFSWrapper
    except ImportError:
        return None
    if kind == "gcs":
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")  # the GCS emulators' variable (gcsfs and Google's clients read it too)
        if emulator:
            parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")
            return ArrowFSWrapper(pafs.GcsFileSystem(anonymous=True, endpoint_override=parsed.netloc, scheme=parsed.scheme))
        return ArrowFSWrapper(pafs.GcsFileSystem())
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return ArrowFSWrapper(pafs.S3FileSystem(**options))


def _arrow_info(fs: fsspec.AbstractFileSystem, key: str) -> dict:
    """Size and ETag of an object through pyarrow (its ``get_file_info`` gives a modification
    time to the second only, too coarse to tell a rewritten object; the HEAD response has the ETag)."""
    with fs.fs.open_input_file(key) as handle:
        meta = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.metadata().items()}
        return {"size": handle.size(), "ETag": meta.get("ETag"), "LastModified": meta.get("Last-Modified")}


def _is_arrow(fs: fsspec.AbstractFileSystem) -> bool:
    return type(fs).__name__ == "ArrowFSWrapper"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) or "does not exist" in str(exc) or "NoSuchKey" in str(exc):
        return "object not found"
    if isinstance(exc, PermissionError) or "AccessDenied" in str(exc) or "403" in str(exc):
        return f"access denied ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return f"cannot read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


__all__ = ["CLOUD_INSTALL", "FilesystemUnavailableError", "ImageSourceError", "filesystem", "is_uri", "local_path", "read_bytes", "version"]
