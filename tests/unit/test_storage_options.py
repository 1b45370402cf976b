"""Credentials go only where they belong (issue 18): the object store's ``storage_options`` reach URLs of
its own bucket or host, never another bucket, another host or a local path. Pure logic: building an
s3fs or local file system object contacts nothing."""

from __future__ import annotations

import pytest

from alya.io.outputs import ObjectStore, same_place

OPTS = {"key": "AKIDEXAMPLE", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9"}


@pytest.mark.parametrize(("url", "gets"), [
    ("s3://bucket/in/x.csv", True), ("s3://BUCKET/in/x.csv", True), ("s3a://bucket/x.csv", True),
    ("s3://other-bucket/x.csv", False),  # the probe of issue 18: it used to get the key and secret
    ("s3://bucketx/x.csv", False), ("s3://bucke/x.csv", False), ("gs://bucket/x.csv", False),
    ("/tmp/x.csv", False), ("file:///tmp/x.csv", False), ("http://bucket/x.csv", False),
])
def test_s3_options_reach_their_own_bucket_only(url: str, gets: bool) -> None:
    store = ObjectStore("s3://bucket/prefix", OPTS)
    assert (store.options_for(url) == OPTS) is gets


@pytest.mark.parametrize(("url", "gets"), [
    ("ftp://files.example:2121/in/x.csv", True), ("ftp://FILES.example:2121/x.csv", True),
    ("ftp://files.example:2122/in/x.csv", False), ("ftp://evil.example:2121/in/x.csv", False),
    ("ftp://files.example.evil:2121/x.csv", False),
])
def test_host_stores_give_their_options_to_their_own_host_only(url: str, gets: bool) -> None:
    assert same_place(url, "ftp://files.example:2121/out", ("ftp",)) is gets
