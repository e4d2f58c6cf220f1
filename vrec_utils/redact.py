"""Keep secrets out of everything vrec prints, logs, warns, raises or saves.

:func:`redact_url` is applied wherever a URL is put into a message or a file; :func:`redact_text`
is the last line of defence of the command line, which passes every message through it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
#: environment variables whose values are secrets (their values never appear in output)
SECRET_ENV_VARS = ("VREC_ES_PASSWORD", "VREC_ES_API_KEY")
#: query parameters that carry credentials
_SECRET_PARAMS = re.compile(r"^(api[_-]?key|apikey|key|token|access[_-]?token|password|passwd|pwd|secret|auth)$", re.I)
# "scheme://user:pass@" inside free text (the userinfo ends at the last @ before the host)
_USERINFO_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@'\"]*@")
_SECRET_PARAM_IN_TEXT = re.compile(
    r"(?P<key>[?&](?:api[_-]?key|apikey|token|access[_-]?token|password|passwd|pwd|secret|auth)=)[^&\s'\"#),;]*", re.I
)


def redact_url(url: str | None) -> str:
    """``url`` without credentials: ``http://user:pass@host:9200/?api_key=k`` ->
    ``http://***@host:9200/?api_key=***``. Also masks a userinfo given without a scheme."""
    if not url:
        return "" if url is None else url
    text = str(url)
    if "://" not in text:  # e.g. "user:pass@host:9200", a malformed setting that is still secret
        return re.sub(r"^[^\s/@]*@", MASK + "@", text)
    try:
        parts = urlsplit(text)
    except ValueError:
        return redact_text(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAMS.match(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_PARAMS.match(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def known_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Secret values configured in the environment: VREC_ES_PASSWORD, VREC_ES_API_KEY and the
    password (or user:password) inside VREC_ES_URL."""
    env = os.environ if environ is None else environ
    values = [env.get(var, "").strip() for var in SECRET_ENV_VARS]
    url = env.get("VREC_ES_URL", "").strip()
    userinfo = url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[0]
    if userinfo:
        values += [userinfo, userinfo.partition(":")[2]]
    return [v for v in values if len(v) >= 3]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL credentials (userinfo, api-key parameters) and each of ``secrets`` masked."""
    text = _USERINFO_IN_TEXT.sub(lambda m: m.group("scheme") + MASK + "@", str(text))
    text = _SECRET_PARAM_IN_TEXT.sub(lambda m: m.group("key") + MASK, text)
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text
