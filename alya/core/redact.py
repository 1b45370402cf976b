"""URLs fit for messages and logs: the one place that finds a URL's credentials and hides them.

A URL's user info (``user:password@``) ends at the **last** ``@`` before the host. Passwords are often
written into a URL unencoded and may then hold ``/``, ``?``, ``#`` or ``@``; a parser that ends the
authority at the first ``/``, ``?`` or ``#`` (a regex, or ``urllib.parse.urlsplit`` on the whole URL) would
leave the rest of such a password in the "path" and print it. So the user info is found here on the
authority as a password-bearing URL has it, up to its last ``@``.

When the last ``@`` may as well lie in the path (``https://host:8443/a@b.csv`` reads like the user ``host``
with the password ``8443/a``), more is masked, never less: no password can be shown.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_AUTHORITY_END = re.compile(r"[/?#]")


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


def redact_url(url: str, *, query: bool = True) -> str:
    """``url`` with its user info (user:password) replaced by ``***``; with ``query=False`` also without
    its query and fragment (signed URLs carry their signature there, database URLs may carry a password)."""
    head, userinfo, rest = split_userinfo(url)
    if not query:
        rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    return url if userinfo is None and query else f"{head}{'' if userinfo is None else MASK + '@'}{rest}"


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
    return {s for s in (userinfo, secret, unquote(secret)) if s}


def url_error(variable: str, url: str, problem: str) -> str:
    """A ConfigError message about a URL setting that never echoes its credentials, not even where the
    ``problem`` (often a driver's own message) quotes them."""
    for secret in sorted(secrets_of(url), key=len, reverse=True):
        problem = problem.replace(secret, MASK)
    return f"{variable}={redact_url(url)!r}: {problem}"
