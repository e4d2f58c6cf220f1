"""Elasticsearch connection settings and errors: the config (file, else environment variables),
the client (``connect``) and one-line messages for every failure a user can fix.

See :mod:`vrec_utils.index.elasticsearch` for the variables and the error classes raised.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from ..redact import redact_url
from .base import BackendUnavailableError, IndexNotFoundError

DEFAULT_URL = "http://localhost:9200"
DEFAULT_INDEX = "vrec-items"
ENV_VARS = {
    "url": "VREC_ES_URL",
    "api_key": "VREC_ES_API_KEY",
    "username": "VREC_ES_USER",
    "password": "VREC_ES_PASSWORD",
    "ca_certs": "VREC_ES_CA_CERTS",
    "verify_certs": "VREC_ES_VERIFY_CERTS",
    "index": "VREC_ES_INDEX",
}
START_HINT = (
    "set VREC_ES_URL to your server's address, or start a local one with "
    "`docker compose up -d elasticsearch` (docker-compose.yml at the repository root) "
    "or `bash scripts/es-test-node.sh start`"
)
_INDEX_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,254}$")


@dataclass(frozen=True)
class ElasticsearchConfig:
    """Where and how to connect. Secrets are kept out of ``repr``."""

    url: str = DEFAULT_URL
    index: str | None = None
    api_key: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_certs: str | None = None
    verify_certs: bool = True
    request_timeout: float = 30.0
    #: timeout of the first contact: an unreachable server is reported fast
    ping_timeout: float = 3.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^\s/]+", self.url or ""):
            raise ValueError(f"Elasticsearch URL must look like http(s)://host:9200, got {redact_url(self.url or '')!r} (VREC_ES_URL)")
        parts = urlsplit(self.url)
        if parts.username is not None or parts.password is not None:
            # user:password@ in the URL becomes basic auth; the URL kept (and shown) has none
            if self.username or self.password or self.api_key:
                raise ValueError(
                    f"credentials in VREC_ES_URL ({redact_url(self.url)}) and in VREC_ES_USER/VREC_ES_PASSWORD/"
                    "VREC_ES_API_KEY: give them one way"
                )
            object.__setattr__(self, "username", unquote(parts.username or ""))
            object.__setattr__(self, "password", unquote(parts.password or ""))
            object.__setattr__(self, "url", without_credentials(self.url))
        if self.api_key and (self.username or self.password):
            raise ValueError("set either an API key (VREC_ES_API_KEY) or basic auth (VREC_ES_USER/VREC_ES_PASSWORD), not both")
        if bool(self.username) != bool(self.password):
            raise ValueError("basic auth needs both VREC_ES_USER and VREC_ES_PASSWORD")
        if self.ca_certs and not Path(self.ca_certs).expanduser().is_file():
            raise ValueError(f"CA certificate file {self.ca_certs!r} does not exist (VREC_ES_CA_CERTS)")
        if self.index is not None:
            check_index_name(self.index)
        for name in ("request_timeout", "ping_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0")

    @property
    def auth(self) -> str:
        return "api_key" if self.api_key else "basic" if self.username else "none"


def without_credentials(url: str) -> str:
    """``url`` without its ``user:password@`` part: the address the client connects to once the
    credentials have moved into ``username``/``password`` (messages use :func:`redact_url`, which
    also masks malformed URLs)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def load_es_config(
    config_file: str | os.PathLike | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> ElasticsearchConfig:
    """Settings from ``overrides`` > ``config_file`` (JSON or TOML, optionally under an
    ``[elasticsearch]`` table) > ``VREC_ES_*`` environment variables > ``defaults`` > built-ins."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = dict(defaults or {})
    for key, var in ENV_VARS.items():
        if env.get(var, "").strip():
            values[key] = env[var].strip()
    if config_file is not None:
        values.update(_read_config_file(Path(config_file)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ElasticsearchConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown Elasticsearch setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "verify_certs" in values:
        values["verify_certs"] = _as_bool(values["verify_certs"], "verify_certs (VREC_ES_VERIFY_CERTS)")
    for key in ("request_timeout", "ping_timeout"):
        if key in values:
            values[key] = float(values[key])
    if "max_retries" in values:
        values["max_retries"] = int(values["max_retries"])
    return ElasticsearchConfig(**values)


def _read_config_file(path: Path) -> dict[str, Any]:
    path = path.expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Elasticsearch config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse Elasticsearch config file {str(path)!r}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("elasticsearch"), dict):
        data = data["elasticsearch"]
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a table/object of settings")
    data = dict(data)
    if "user" in data:
        data["username"] = data.pop("user")
    if (data.get("api_key") or data.get("password")) and os.name == "posix":
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.warn(f"{path} holds a secret but is readable by other users; chmod 600 it", stacklevel=3)
    return data


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def check_index_name(name: str) -> str:
    if not isinstance(name, str) or not _INDEX_NAME.match(name):
        raise ValueError(
            f"invalid Elasticsearch index name {name!r}: use lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_index_name(catalog_name: str | None = None) -> str:
    if not catalog_name:
        return DEFAULT_INDEX
    slug = re.sub(r"[^a-z0-9]+", "-", catalog_name.lower()).strip("-")
    return f"vrec-{slug}" if slug else DEFAULT_INDEX


# ---------------------------------------------------------------------------------------- client


def _import_elasticsearch():
    try:
        import elasticsearch
    except ImportError as exc:
        raise BackendUnavailableError(
            "the Elasticsearch backend needs the official client: pip install 'vrec[es]' "
            "(elasticsearch>=8.13,<10)"
        ) from exc
    return elasticsearch


def connect(config: ElasticsearchConfig | None = None, **client_options: Any):
    """An ``elasticsearch.Elasticsearch`` client, checked with one quick request.

    Raises :class:`BackendUnavailableError` with one clear line when the server is unreachable,
    refuses the credentials or the TLS setup, or is not Elasticsearch 8+.
    """
    es = _import_elasticsearch()
    config = config or load_es_config()
    kwargs: dict[str, Any] = {
        "hosts": [config.url],
        "request_timeout": config.request_timeout,
        "max_retries": config.max_retries,
        "retry_on_timeout": True,
    }
    if config.api_key:
        kwargs["api_key"] = config.api_key
    elif config.username:
        kwargs["basic_auth"] = (config.username, config.password)
    if config.url.startswith("https://"):
        kwargs["verify_certs"] = config.verify_certs
        if config.ca_certs:
            kwargs["ca_certs"] = str(Path(config.ca_certs).expanduser())
        if not config.verify_certs:
            kwargs["ssl_show_warn"] = False
    elif config.auth != "none":
        warnings.warn(f"sending Elasticsearch credentials over plain http to {config.url}", stacklevel=2)
    kwargs.update(client_options)
    client = es.Elasticsearch(**kwargs)
    quick = client.options(request_timeout=config.ping_timeout, max_retries=0)
    pool_log = logging.getLogger("elastic_transport.node_pool")
    level = pool_log.level
    pool_log.setLevel(logging.ERROR)  # a 405 on `GET /` is no node failure worth a warning
    try:
        info = _checked(quick.info, config.url, root=True)
    except _RootMissing:
        # Servers without the rest-root module (Elastic's integration-test distribution) have no
        # `GET /`: check the cluster instead; the product header was checked by the client.
        _checked(quick.cluster.health, config.url)
        return client
    finally:
        pool_log.setLevel(level)
    version = str(info.get("version", {}).get("number", "0"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < 8:
        raise BackendUnavailableError(f"Elasticsearch at {config.url} is version {version}; vrec needs 8.x or 9.x")
    return client


class _RootMissing(Exception):
    """``GET /`` answered 404/405: a server without the rest-root module."""


def _checked(call, url: str, index: str | None = None, *, root: bool = False):
    """Run one client call, turning transport, auth, readiness and missing-index failures into
    the project's exceptions with one line naming ``url`` (never credentials) and the way out."""
    import elastic_transport
    from elasticsearch import ApiError, AuthorizationException, UnsupportedProductError

    url = redact_url(url)
    try:
        return call()
    except elastic_transport.TlsError as exc:
        raise BackendUnavailableError(
            f"TLS handshake with Elasticsearch at {url} failed ({_reason(exc)}); set VREC_ES_CA_CERTS to the "
            "cluster's CA file (or VREC_ES_VERIFY_CERTS=false for a throwaway local cluster)"
        ) from None
    except (elastic_transport.ConnectionError, elastic_transport.ConnectionTimeout) as exc:
        raise BackendUnavailableError(
            f"cannot reach Elasticsearch at {url} ({_reason(exc)}); {START_HINT}"
        ) from None
    except AuthorizationException as exc:
        raise BackendUnavailableError(
            f"Elasticsearch at {url} denied the request (403: {_reason(exc)}); the API key or user needs "
            "read/write/manage privileges on the vrec index"
        ) from None
    except UnsupportedProductError:
        raise BackendUnavailableError(f"the server at {url} is not Elasticsearch") from None
    except ApiError as exc:
        kind, reason = _error_parts(exc.body, _reason(exc))
        _raise_api_error(exc.status_code, kind, reason, url, index, root=root)  # 401 (AuthenticationException) too
        raise


def _error_parts(body: Any, default: str = "") -> tuple[str, str]:
    """(type, one-line reason) of an Elasticsearch error body."""
    error = body.get("error") if isinstance(body, Mapping) else body
    if not isinstance(error, Mapping):
        return "", str(error or default).splitlines()[0][:200] if (error or default) else ""
    kind = str(error.get("type", ""))
    reason = str(error.get("reason") or default)
    text = f"{kind}: {reason}" if kind and kind not in reason else reason
    return kind, text.splitlines()[0][:200] if text else kind


def _raise_api_error(status: int, kind: str, reason: str, url: str, index: str | None, *, root: bool = False) -> None:
    """Raise the project's exception for an Elasticsearch error answer (returns for the others)."""
    if root and status in (404, 405, 410):
        raise _RootMissing()
    if status == 404 and kind in ("index_not_found_exception", ""):
        raise IndexNotFoundError(
            f"Elasticsearch at {url} has no index {index or '(unknown)'!r} ({reason}); check the index name "
            "(VREC_ES_INDEX, --es-index) or build it: vrec index --backend elasticsearch ..."
        )
    if status == 503:
        raise BackendUnavailableError(
            f"Elasticsearch at {url} is not ready (503: {reason}); it may still be starting or the index's "
            "shards are not assigned: wait until GET /_cluster/health is yellow or green, then retry"
        )
    if status == 401:
        raise BackendUnavailableError(
            f"Elasticsearch at {url} refused the credentials (401); set VREC_ES_API_KEY, or "
            "VREC_ES_USER and VREC_ES_PASSWORD, or the api_key/username/password of your config file"
        )


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__
