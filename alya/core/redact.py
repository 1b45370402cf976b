"""URLs fit for messages and logs: the one place that finds a URL's credentials and hides them.

A URL's user info (``user:password@``) ends at the **last** ``@`` before the host. Passwords are often
written into a URL unencoded and may then hold ``/``, ``?``, ``#`` or ``@``; a parser that ends the
authority at the first ``/``, ``?`` or ``#`` (a regex, or ``urllib.parse.urlsplit`` on the whole URL) would
leave the rest of such a password in the "path" and print it. So the user info is found here on the
authority as a password-bearing URL has it, up to its last ``@``.

When the last ``@`` may as well lie in the path (``https://host:8443/a@b.csv`` reads like the user ``host``
with the password ``8443/a``), more is masked, never less: no password can be shown.

Secrets also travel in query strings (``?password=``, ``?token=``, a pre-signed URL's ``X-Amz-Signature``,
an Azure SAS ``sig=``): their values are masked too, keys found as ``urllib.parse`` decodes them. Free text
(an exception's message, a log value) is redacted URL by URL (:func:`redact_text`); a URL in free text ends
at white space or a quote, so a password holding those must be percent-encoded to be found whole.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

MASK = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_AUTHORITY_END = re.compile(r"[/?#]")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*")
_SECRET_KEYS = frozenset({"password", "passwd", "pwd", "pass", "token", "sig", "signature", "secret", "key",
                          "apikey", "api_key", "access_key", "auth", "credential", "credentials", "sas"})
_SECRET_SUFFIXES = ("password", "token", "secret", "signature", "credential", "_key", "-key")


def split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``(scheme://, user info, the rest)`` of a URL; the user info is None when the URL has none (or no
    ``scheme://``: a plain path has no credentials), and never includes its ``@``."""
    m = _SCHEME.match(url)
    if m is None:
        return "", None, url
    head, rest = url[:m.end()], url[m.end():]
    at = rest.rfind("@")
    if at < 0:
        return head, None, rest
    before = rest[:at]
    end = _AUTHORITY_END.search(before)
    if end is None or ":" in before[:end.start()]:
        # "user:pass/wo?r#d@host" or "user@host": all up to the last @ (a password always follows a ':')
        return head, before, rest[at + 1:]
    # "bucket/dir/a@b.csv": the last @ is in the path; user info, if any, is in the authority proper
    authority = rest[:end.start()]
    at = authority.rfind("@")
    if at < 0:
        return head, None, rest
    return head, authority[:at], rest[at + 1:]


def secret_key(name: str) -> bool:
    """Whether a query parameter (or option) of this name carries a secret (``password``, ``token``,
    ``sig``, ``X-Amz-Signature``, ``client_secret``, ``api_key``...)."""
    key = unquote(name).strip().lower()
    return key in _SECRET_KEYS or key.endswith(_SECRET_SUFFIXES)


def _mask_query(query: str) -> str:
    """``a=1&token=xyz`` -> ``a=1&token=***``: each ``key=value`` whose key names a secret loses its value;
    the rest is kept as written (not re-encoded)."""
    parts = []
    for part in query.split("&"):
        name, sep, value = part.partition("=")
        parts.append(f"{name}={MASK}" if sep and value and secret_key(name) else part)
    return "&".join(parts)


def redact_url(url: str, *, query: bool = True) -> str:
    """``url`` with its user info (user:password) replaced by ``***`` and the values of secret query
    parameters (``password=``, ``token=``, ``sig=``...) by ``***``; with ``query=False`` without its query
    and fragment at all (what logs and messages show)."""
    head, userinfo, rest = split_userinfo(url)
    if not query:
        rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    elif "?" in rest:
        before, _, after = rest.partition("?")
        q, hash_, fragment = after.partition("#")
        rest = f"{before}?{_mask_query(q)}{hash_}{fragment}"
    return f"{head}{'' if userinfo is None else MASK + '@'}{rest}"


def stored_url(url: str) -> str:
    """A URL as alya stores it (``batches.inputfile``, ``batch_files.url``): what a reader of the tables
    may see, so without credentials; the query stays (its secret values masked): it may name a version."""
    return redact_url(url)


def redact_text(text: str) -> str:
    """Free text (an error message, a log value) with every URL in it redacted (:func:`redact_url`)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_value(value: Any) -> Any:
    """A log value with the URLs of its text redacted, inside lists, tuples and dicts too."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def shown_url(url: str) -> str:
    """A URL as logs, artifacts and messages show it: user info masked, query and fragment dropped."""
    return redact_url(url, query=False)


def secrets_of(url: str) -> set[str]:
    """The texts of ``url`` that must never be shown: its password (the whole user info when it has no
    ``:``, a token), as written and percent-decoded (a driver may echo either in an error message)."""
    _, userinfo, _ = split_userinfo(url)
    if not userinfo:
        return set()
    secret = userinfo.partition(":")[2] if ":" in userinfo else userinfo
    # A driver that ends the user info at the first '@' or '/' (libpq does) quotes the rest of the password
    # as a host or a path: each such piece is a secret too.
    pieces = {p for p in re.split(r"[@/?#:]", secret) if len(p) >= 3}
    return {s for s in (userinfo, secret, unquote(secret), *pieces) if s}


def url_error(variable: str, url: str, problem: str) -> str:
    """A ConfigError message about a URL setting that never echoes its credentials, not even where the
    ``problem`` (often a driver's own message) quotes them."""
    for secret in sorted(secrets_of(url), key=len, reverse=True):
        problem = problem.replace(secret, MASK)
    return f"{variable}={redact_url(url)!r}: {problem}"
