"""Confinement of URLs that come from outside the application: the folders and files a Prefect flow run's
parameters name (``alya-intake``, ``alya-submit-file``: anyone with the Prefect UI or API sets them), or that
an application passes on from its own users (``file_submit``, ``intake_scan`` under ``ALYA_INTAKE_ROOTS``).

A URL is allowed only under one of the *roots* (URL prefixes), compared on a normalised form and decided
before any byte is read or any request is made:

- the scheme and host (an S3 bucket, an HTTP host and port) must equal the root's; ``http(s)://`` is thus
  reachable only when a root names it;
- the path must be the root's path or below it, segment by segment (``/data/in`` does not cover
  ``/data/inbox``); no ``.`` or ``..`` segment, no empty segment, no backslash, also once percent-decoded
  (an HTTP server decodes ``%2e%2e``);
- no query, no fragment (``#.csv`` must not make a URL look like a CSV file), no fsspec chaining (``::``),
  no user info (credentials belong in storage options), no control character;
- a local path is resolved (``os.path.realpath``) first, so a symlink that leads out of a root is outside.

Pure logic, apart from resolving local paths: the file systems are never asked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from alya.core.errors import InvalidInput
from alya.core.redact import shown_url, split_userinfo

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL = ("file", "local")


@dataclass(frozen=True, slots=True)
class Location:
    """A URL reduced to what confinement compares: scheme, host (lower-case) and path segments. Local
    paths are ``("file", "", real path segments)``."""

    scheme: str
    host: str
    segments: tuple[str, ...]

    def within(self, root: Location) -> bool:
        return (self.scheme, self.host) == (root.scheme, root.host) and \
            self.segments[:len(root.segments)] == root.segments


def locate(url: str) -> Location:
    """The normalised location of ``url``, or InvalidInput (never echoing a credential) when it plays
    games: query, fragment, ``::``, user info, ``.``/``..``/empty segments, backslashes, control
    characters."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"a URL or path is needed, got {url!r}")
    url = url.strip()
    shown = shown_url(url)
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise InvalidInput(f"{shown!r}: control characters are not allowed in a URL")
    if "::" in url:
        raise InvalidInput(f"{shown}: chained URLs (::) are not allowed")
    if "\\" in url:
        raise InvalidInput(f"{shown}: backslashes are not allowed in a URL")
    m = _SCHEME.match(url)
    if m is None or m.group(1).lower() in _LOCAL:
        return _local(url if m is None else url[m.end():], shown)
    if split_userinfo(url)[1] is not None:
        raise InvalidInput(f"{shown}: a URL must not carry credentials (user:password@); give them as "
                           "storage options")
    if "?" in url or "#" in url:
        raise InvalidInput(f"{shown}: a query or fragment (? #) is not allowed in this URL")
    parts = urlsplit(url)
    host = parts.netloc.lower()
    if not host:
        raise InvalidInput(f"{shown}: the URL names no host or bucket")
    return Location(parts.scheme.lower(), host, _segments(parts.path, shown))


def _segments(path: str, shown: str) -> tuple[str, ...]:
    segs = path.strip("/").split("/") if path.strip("/") else []
    for seg in segs:
        decoded = unquote(seg)
        if seg in ("", ".", "..") or decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise InvalidInput(f"{shown}: '.', '..' and empty path segments are not allowed")
    return tuple(segs)


def _local(path: str, shown: str) -> Location:
    if path.startswith("localhost/"):
        path = path[len("localhost"):]
    real = os.path.realpath(path)  # ".." and symlinks resolved: where the bytes really are
    return Location("file", "", tuple(p for p in real.split(os.sep) if p))


def local_path(url: str) -> str | None:
    """The real path of a local path or ``file://`` URL (None for any other URL)."""
    m = _SCHEME.match(url.strip())
    if m is not None and m.group(1).lower() not in _LOCAL:
        return None
    loc = locate(url)
    return os.sep + os.sep.join(loc.segments)


class Roots:
    """The URL prefixes that confine outside URLs (``ALYA_INTAKE_ROOTS``). No roots: everything is
    refused. ``variable`` names where they come from, for the messages."""

    def __init__(self, roots: Iterable[str], variable: str = "ALYA_INTAKE_ROOTS") -> None:
        self.urls = [r.strip() for r in roots if r and r.strip()]
        self.variable = variable
        self._locations = [locate(r) for r in self.urls]

    def __bool__(self) -> bool:
        return bool(self._locations)

    def check(self, url: str, what: str = "URL") -> str:
        """``url`` itself when it lies under a root (for a local path: its real path, so that the bytes read
        are those checked), else InvalidInput. Nothing is read or fetched."""
        loc = locate(url)
        if not any(loc.within(root) for root in self._locations):
            allowed = ", ".join(shown_url(u) for u in self.urls) or "none"
            raise InvalidInput(f"{what} {shown_url(url.strip())} is not under {self.variable}: {allowed}")
        return local_path(url) or url.strip()

    def allows(self, url: str) -> bool:
        try:
            self.check(url)
        except InvalidInput:
            return False
        return True


def parse_roots(value: str | Sequence[str] | None) -> list[str]:
    """``ALYA_INTAKE_ROOTS`` as a list: URL prefixes separated by commas (or a list); each must itself be
    a clean URL or path (InvalidInput otherwise)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [str(v).strip() for v in items if str(v).strip()]
    for root in out:
        locate(root)
    return out
