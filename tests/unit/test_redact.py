"""The URL redactor (``alya.core.redact``): no password is ever shown, whatever it holds (``/``, ``?``,
``#``, ``@``, ``:``), and URLs without credentials are shown as they are. Pure logic: no service needed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alya.core.redact import redact_url, secrets_of, shown_url, split_userinfo, url_error

schemes = st.sampled_from(["postgresql", "postgresql+psycopg2", "redis", "rediss", "s3", "https", "sftp"])
users = st.text("abcdefghijklmnopqrstuvwxyz0123456789._~-%", max_size=8)
# anything but '*' (the mask itself): the characters that break naive parsers are drawn often
passwords = st.text(st.one_of(st.sampled_from("/?#@:%+ &=;[]"), st.characters(exclude_characters="*")),
                    min_size=1, max_size=16)
hosts = st.from_regex(r"[a-z][a-z0-9-]{0,8}(\.[a-z]{2,4})?(:[0-9]{1,5})?", fullmatch=True)
paths = st.from_regex(r"(/[A-Za-z0-9._-]{0,8}){0,3}", fullmatch=True)
queries = st.from_regex(r"(\?[a-z]{1,5}=[A-Za-z0-9/+@:]{0,10}(&[a-z]{1,5}=[A-Za-z0-9]{0,6})?)?(#[a-z0-9]{0,5})?",
                        fullmatch=True)


@given(schemes, users, passwords, hosts, paths, queries)
def test_a_password_is_masked_whatever_it_holds(scheme: str, user: str, pw: str, host: str, path: str,
                                                query: str) -> None:
    url = f"{scheme}://{user}:{pw}@{host}{path}{query}"
    if "@" in query:  # the last @ is in the query: everything before it is masked, nothing after it shown twice
        assert redact_url(url) == f"{scheme}://***@{url.rsplit('@', 1)[1]}"
    else:
        assert redact_url(url) == f"{scheme}://***@{host}{path}{query}"
        assert shown_url(url) == f"{scheme}://***@{host}{path}"
    assert shown_url(url).startswith(f"{scheme}://***@")


@given(schemes, users, passwords, hosts, paths)
def test_a_config_error_never_quotes_the_password(scheme: str, user: str, pw: str, host: str, path: str) -> None:
    url = f"{scheme}://{user}:{pw}@{host}{path}"
    text = url_error("ALYA_X_URL", url, f"the driver said: bad password {pw!r} for {url}")
    shown = f"ALYA_X_URL='{scheme}://***@{host}{path}': "
    assert text.startswith(shown) and pw not in text[len(shown):]


@given(schemes, hosts, paths, queries)
def test_a_url_without_credentials_is_shown_as_it_is(scheme: str, host: str, path: str, query: str) -> None:
    url = f"{scheme}://{host}{path}{query}"
    if "@" not in query:
        assert redact_url(url) == url
        assert split_userinfo(url) == (f"{scheme}://", None, f"{host}{path}{query}")
    assert shown_url(url) == f"{scheme}://{host}{path}" or "@" in query


@pytest.mark.parametrize(("url", "redacted"), [
    ("redis://user:pw@h:1/0", "redis://***@h:1/0"),
    ("redis://:pw@h:1/0", "redis://***@h:1/0"),
    ("postgresql://alya:pa/ss@db:5432/alya", "postgresql://***@db:5432/alya"),
    ("postgresql://alya:p?a#s@s@db/alya?sslmode=require", "postgresql://***@db/alya?sslmode=require"),
    ("https://TOKEN@example.com/x", "https://***@example.com/x"),
    ("sftp://me@host/in/a@b.csv", "sftp://***@host/in/a@b.csv"),  # the @ in the path is no user info
    ("s3://bucket/in/a@b.csv", "s3://bucket/in/a@b.csv"),
    ("s3://bucket/in/x.csv?X-Amz-Signature=a@b", "s3://bucket/in/x.csv?X-Amz-Signature=a@b"),
    ("/data/in/a@b.csv", "/data/in/a@b.csv"),  # a path, not a URL
    ("s3://bucket/x", "s3://bucket/x"),
    ("", ""),
])
def test_known_urls(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_shown_urls_drop_the_query() -> None:
    assert shown_url("s3://bucket/in/x.csv?X-Amz-Signature=abc") == "s3://bucket/in/x.csv"
    assert shown_url("postgresql://u:p@db/alya?password=x") == "postgresql://***@db/alya"
    assert shown_url("/data/in/x.csv") == "/data/in/x.csv"


def test_secrets_are_the_password_as_written_and_decoded() -> None:
    assert secrets_of("redis://u:p%40ss@h") == {"u:p%40ss", "p%40ss", "p@ss"}
    assert secrets_of("https://TOKEN@h/x") == {"TOKEN"}
    assert secrets_of("s3://bucket/x") == set()


def test_redacted_urls_never_show_a_password() -> None:
    assert redact_url("redis://user:pw@h:1/0") == "redis://***@h:1/0"
    assert redact_url("s3://bucket/x") == "s3://bucket/x"
