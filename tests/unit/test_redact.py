"""The URL redactor (``alya.core.redact``): no password is ever shown, whatever it holds (``/``, ``?``,
``#``, ``@``, ``:``), and URLs without credentials are shown as they are. Pure logic: no service needed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alya.core.redact import redact_text, redact_url, secrets_of, shown_url, split_userinfo, stored_url, url_error

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
    ("s3://bucket/in/x.csv?X-Amz-Signature=a@b", "s3://bucket/in/x.csv?X-Amz-Signature=***"),
    ("https://h/x.csv?v=2&token=t0k&sig=s1g#f", "https://h/x.csv?v=2&token=***&sig=***#f"),
    ("postgresql://db/alya?password=pw&sslmode=require", "postgresql://db/alya?password=***&sslmode=require"),
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


@given(schemes, users, passwords, hosts, paths)
def test_text_quoting_a_url_never_shows_its_password(scheme: str, user: str, pw: str, host: str, path: str) -> None:
    """Free text (an error message, a log value) quoting a URL: the password goes, whatever it holds
    (white space and quotes end a URL in free text: such passwords must be percent-encoded)."""
    pw = "".join(c for c in pw if not c.isspace() and c not in "'\"<>`") or "x"
    url = f"{scheme}://{user}:{pw}@{host}{path}"
    text = redact_text(f"InvalidInput: no file at {url} (after 3 tries)")
    assert text == f"InvalidInput: no file at {scheme}://***@{host}{path} (after 3 tries)"


def test_stored_urls_keep_no_credential() -> None:
    """What goes into batches.inputfile and batch_files.url: user info and secret query values masked."""
    assert stored_url("http://svc:Http/P?a#s@s:w0rd@127.0.0.1:9/x.csv") == "http://***@127.0.0.1:9/x.csv"
    assert stored_url("s3://b/in/x.csv?versionId=3&X-Amz-Security-Token=abc") == \
        "s3://b/in/x.csv?versionId=3&X-Amz-Security-Token=***"
    assert stored_url("/data/in/a.csv") == "/data/in/a.csv"


def test_every_log_line_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """The structlog chain's last step redacts every URL of every value, whoever logged it."""
    from alya.core.logs import configure, get_logger

    configure(fmt="json", force=True)
    get_logger().warning("probe", error="cannot read https://u:p/a?s#s@w@host/x.csv?sig=SIGNED",
                         urls=["redis://:Redis/Pw@h:1/0"])
    err = capsys.readouterr().err
    assert "p/a?s#s@w" not in err and "SIGNED" not in err and "Redis/Pw" not in err
    assert "https://***@host/x.csv?sig=***" in err and "redis://***@h:1/0" in err
