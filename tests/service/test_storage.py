"""Both storage backends (local folder, SeaweedFS S3) behave alike; source URIs are allow-listed."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx
import pytest
from boto3.s3.transfer import TransferConfig

from service.settings import Settings
from service.storage import (
    ImageSource,
    LocalStorage,
    NotFound,
    S3Storage,
    SourceLocation,
    Storage,
    StorageError,
    open_image_source,
    parse_source_uri,
    s3_client,
    s3_client_config,
    storage_from_url,
)
from service.uploads import MIN_PART_BYTES
from tests.service.conftest import multipart_uploads, parts_storage

BAD_KEYS = ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "a\\b", "a/", "a\x00b"]
BAD_PREFIXES = ["/abs", "../", "a/../", "a//", "./"]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """The same tests against both backends (S3: a fresh bucket, under a key prefix)."""
    if request.param == "local":
        return storage_from_url((tmp_path / "store").as_uri(), Settings.from_values(home=tmp_path))
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return storage_from_url(f"s3://{bucket}/out/v1", server.settings(tmp_path))


def test_put_get_exists(storage: Storage) -> None:
    storage.put_bytes("jobs/j1/job.json", b'{"a": 1}', content_type="application/json")
    assert storage.get_bytes("jobs/j1/job.json") == b'{"a": 1}'
    assert storage.exists("jobs/j1/job.json")
    assert not storage.exists("jobs/j1/other.json")
    assert not storage.exists("jobs/j1")  # a folder is not an object


def test_overwrite_replaces_whole_object(storage: Storage) -> None:
    storage.put_bytes("k.bin", b"old" * 1000)
    storage.put_bytes("k.bin", b"new")
    assert storage.get_bytes("k.bin") == b"new"
    assert storage.list("") == ["k.bin"]  # no temp files left visible


def test_list_is_sorted_with_string_prefixes(storage: Storage) -> None:
    keys = ["b/2.txt", "a/10.txt", "ab.txt", "a/2.txt", "a/1.txt", "a/sub/x.txt"]
    for key in keys:
        storage.put_bytes(key, key.encode())
    assert storage.list() == sorted(keys)
    assert storage.list("a/") == ["a/1.txt", "a/10.txt", "a/2.txt", "a/sub/x.txt"]
    assert storage.list("a") == ["a/1.txt", "a/10.txt", "a/2.txt", "a/sub/x.txt", "ab.txt"]
    assert storage.list("a/1") == ["a/1.txt", "a/10.txt"]
    assert storage.list("zzz/") == []


def test_delete_prefix(storage: Storage) -> None:
    for key in ["jobs/1/a", "jobs/1/s/b", "jobs/10/c", "other"]:
        storage.put_bytes(key, b"x")
    assert storage.delete_prefix("jobs/1/") == 2
    assert storage.list() == ["jobs/10/c", "other"]
    assert storage.delete_prefix("nothing/") == 0
    with pytest.raises(ValueError, match="empty"):
        storage.delete_prefix("")


def test_missing_key_raises_not_found(storage: Storage) -> None:
    with pytest.raises(NotFound, match="missing.png") as info:
        storage.get_bytes("jobs/missing.png")
    assert isinstance(info.value, StorageError)
    with pytest.raises(NotFound):
        storage.open_read("jobs/missing.png")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_traversal_keys_rejected(storage: Storage, key: str) -> None:
    for call in (
        lambda: storage.put_bytes(key, b"x"),
        lambda: storage.get_bytes(key),
        lambda: storage.exists(key),
        lambda: storage.url(key),
        lambda: storage.presigned_url(key),
    ):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("prefix", BAD_PREFIXES)
def test_traversal_prefixes_rejected(storage: Storage, prefix: str) -> None:
    with pytest.raises(ValueError):
        storage.list(prefix)
    with pytest.raises(ValueError):
        storage.delete_prefix(prefix)


def test_put_file_and_stream(storage: Storage, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    storage.put_file("shards/000000.tar", path)
    assert storage.get_bytes("shards/000000.tar") == data
    with storage.open_read("shards/000000.tar") as stream:
        chunks = [stream.read(65536) for _ in range(5)]
    assert b"".join(chunks) == data


def test_put_file_missing_source(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nope.tar"):
        storage.put_file("shards/000001.tar", tmp_path / "nope.tar")
    assert storage.list() == []


def test_url_is_canonical(storage: Storage) -> None:
    url = storage.url("jobs/j1/manifest.parquet")
    assert url.startswith(storage.root_url + "/")
    assert url.endswith("/jobs/j1/manifest.parquet")


def test_local_overwrite_is_atomic_for_open_readers(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("k", b"first")
    with store.open_read("k") as reader:
        store.put_bytes("k", b"second")
        assert reader.read() == b"first"  # the old inode stays whole under a reader
    assert store.get_bytes("k") == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o644


def test_local_presigned_url_is_file_url(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "out")
    store.put_bytes("a b/c.png", b"png")
    url = store.presigned_url("a b/c.png", expires_s=60)
    assert url.startswith("file:///")
    assert Path(url2pathname(urlsplit(url).path)).read_bytes() == b"png"


def test_local_delete_prefix_prunes_empty_folders(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("jobs/1/shards/a", b"x")
    store.put_bytes("jobs/2/b", b"x")
    store.delete_prefix("jobs/1/")
    assert not (tmp_path / "jobs" / "1").exists()
    assert (tmp_path / "jobs" / "2" / "b").exists()


def test_local_delete_prefix_removes_a_killed_writers_unfinished_upload(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("jobs/1/shards/000000-1.parquet", b"x")
    left = store.open_upload("jobs/1/shards/000001-2.tar")  # its worker died: never finished
    left.write(b"half a tar")
    store.put_bytes("jobs/10/a", b"x")
    assert store.delete_prefix("jobs/1/") == 1
    assert not (tmp_path / "jobs" / "1").exists()
    assert store.list("jobs/") == ["jobs/10/a"]


def test_local_root_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        LocalStorage("relative/dir")


def test_local_nothing_created_until_written(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "later")
    assert store.list() == []
    assert not (tmp_path / "later").exists()


# --- S3 only -------------------------------------------------------------------------------------


def test_presigned_get_and_tampered_url(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    store = storage_from_url(f"s3://{s3_bucket}/out", s3_server.settings(tmp_path))
    store.put_bytes("jobs/j/manifest.jsonl", b'{"key": "0"}\n')
    url = store.presigned_url("jobs/j/manifest.jsonl", expires_s=300)
    ok = httpx.get(url)
    assert ok.status_code == 200
    assert ok.content == b'{"key": "0"}\n'

    parts = urlsplit(url)
    query = parts.query.replace("X-Amz-Signature=", "X-Amz-Signature=0", 1)
    tampered = urlunsplit(parts._replace(query=query))
    assert httpx.get(tampered).status_code == 403
    other_key = url.replace("manifest.jsonl", "errors.jsonl")
    assert httpx.get(other_key).status_code == 403
    assert httpx.get(url.split("?", 1)[0]).status_code == 403  # anonymous


def test_presigned_expiry_bounds(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    store = storage_from_url(f"s3://{s3_bucket}", s3_server.settings(tmp_path))
    for expires in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError, match="expires_s"):
            store.presigned_url("k", expires_s=expires)


def test_content_type_and_bucket_root(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    store = storage_from_url(f"s3://{s3_bucket}", s3_server.settings(tmp_path))
    assert store.root_url == f"s3://{s3_bucket}"
    store.put_bytes("img/0001.png", b"\x89PNG")
    store.put_bytes("blob", b"x", content_type="application/x-tar")
    client = s3_server.client()
    assert client.head_object(Bucket=s3_bucket, Key="img/0001.png")["ContentType"] == "image/png"
    assert client.head_object(Bucket=s3_bucket, Key="blob")["ContentType"] == "application/x-tar"
    assert store.url("img/0001.png") == f"s3://{s3_bucket}/img/0001.png"
    assert store.list() == ["blob", "img/0001.png"]


def test_multipart_upload(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    mib = 1024 * 1024
    store = S3Storage(
        s3_bucket,
        "big",
        client=s3_client(s3_server.settings(tmp_path)),
        transfer_config=TransferConfig(multipart_threshold=5 * mib, multipart_chunksize=5 * mib),
    )
    data = os.urandom(5 * mib + 12345)
    path = tmp_path / "big.tar"
    path.write_bytes(data)
    store.put_file("shards/000000.tar", path)
    etag = s3_server.client().head_object(Bucket=s3_bucket, Key="big/shards/000000.tar")["ETag"]
    assert etag.strip('"').endswith("-2")  # two parts
    assert store.get_bytes("shards/000000.tar") == data


def test_folder_markers_skipped_then_deleted(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="in/photos/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="in/photos/a.png", Body=b"a")
    store = storage_from_url(f"s3://{s3_bucket}/in", s3_server.settings(tmp_path))
    assert store.list() == ["photos/a.png"]
    assert store.delete_prefix("photos/") == 2
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_missing_bucket_is_a_storage_error(s3_server, tmp_path: Path) -> None:
    store = storage_from_url("s3://dpig-no-such-bucket", s3_server.settings(tmp_path))
    with pytest.raises(StorageError, match="dpig-no-such-bucket"):
        store.get_bytes("k")


def test_retry_config_applied(tmp_path: Path) -> None:
    settings = Settings.from_values(
        home=tmp_path, s3_endpoint_url="http://127.0.0.1:1", s3_region="us-east-1",
        s3_retry_mode="adaptive", s3_max_attempts=7,
    )  # fmt: skip
    config = s3_client_config(settings)
    assert config.retries == {"mode": "adaptive", "total_max_attempts": 7}
    assert config.signature_version == "s3v4"
    store = storage_from_url("s3://bucket-a/p", settings)
    assert isinstance(store, S3Storage)
    applied = store.client.meta.config
    assert applied.retries == {"mode": "adaptive", "total_max_attempts": 7}
    assert applied.s3 == {"addressing_style": "path"}
    defaults = s3_client_config(Settings.from_values(home=tmp_path))
    assert defaults.retries == {"mode": "standard", "total_max_attempts": 10}
    assert defaults.s3 == {"addressing_style": "auto"}


def test_unreachable_endpoint_fails_with_storage_error(tmp_path: Path) -> None:
    settings = Settings.from_values(
        home=tmp_path, s3_endpoint_url="http://127.0.0.1:9", s3_region="us-east-1",
        aws_access_key_id="k", aws_secret_access_key="s", s3_max_attempts=2,
    )  # fmt: skip
    store = storage_from_url("s3://bucket-a", settings)
    with pytest.raises(StorageError, match="s3://bucket-a/k"):
        store.put_bytes("k", b"x")


# --- storage_from_url ----------------------------------------------------------------------------


def test_storage_from_url(tmp_path: Path) -> None:
    settings = Settings.from_values(home=tmp_path, s3_region="us-east-1")
    local = storage_from_url((tmp_path / "o").as_uri() + "/", settings)
    assert isinstance(local, LocalStorage)
    assert local.root == tmp_path / "o"
    s3 = storage_from_url("s3://my-bucket/a/b/", settings)
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.root_url) == ("my-bucket", "a/b", "s3://my-bucket/a/b")


@pytest.mark.parametrize(
    "url",
    ["http://example.com/x", "gs://bucket/x", "/abs/path", "file://host/x", "s3://B_ad/x",
     "s3://bucket/../x", "s3:///x"],
)  # fmt: skip
def test_storage_from_url_rejects(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        storage_from_url(url, Settings.from_values(home=tmp_path))


# --- parse_source_uri ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "allowed", "uri_out", "prefix"),
    [
        ("s3://photos/set1/", ["s3://photos"], "s3://photos/set1", "set1/"),
        ("s3://photos/set1", ["s3://photos/set1/"], "s3://photos/set1", "set1/"),
        ("s3://photos/a/b", ["s3://photos/a"], "s3://photos/a/b", "a/b/"),
        ("s3://photos", ["s3://photos"], "s3://photos", ""),
        ("S3://photos/x/", ["s3://other", "s3://photos/"], "s3://photos/x", "x/"),
    ],
)
def test_parse_source_uri_s3(uri: str, allowed: list[str], uri_out: str, prefix: str) -> None:
    assert parse_source_uri(uri, allowed) == SourceLocation(uri_out, "s3://photos", prefix)


@pytest.mark.parametrize(
    ("uri", "allowed", "problem"),
    [
        ("http://example.com/photos/", ["s3://photos"], "scheme 'http'"),
        ("https://photos.s3.amazonaws.com/x", ["s3://photos"], "scheme 'https'"),
        ("ftp://host/x", ["s3://photos"], "scheme 'ftp'"),
        ("gs://photos/x", ["s3://photos"], "scheme 'gs'"),
        ("s3:/photos/x", ["s3://photos"], "scheme 's3'"),
        ("s3://other/x/", ["s3://photos"], "outside the allowed"),
        ("s3://photos-private/x/", ["s3://photos"], "outside the allowed"),
        ("s3://photos/set10/", ["s3://photos/set1"], "outside the allowed"),
        ("s3://photos/set1/../secret/", ["s3://photos/set1"], "'..'"),
        ("s3://Photos_Bad/x", ["s3://photos"], "bucket name"),
        ("s3://photos/x?versionId=1", ["s3://photos"], "query"),
        ("s3://photos/x/", [], "none configured"),
        ("", ["s3://photos"], "empty"),
    ],
)  # fmt: skip
def test_parse_source_uri_rejects(uri: str, allowed: list[str], problem: str) -> None:
    with pytest.raises(ValueError, match="^images: .*" + problem.replace("?", r"\?")):
        parse_source_uri(uri, allowed, field="images")


def test_parse_source_uri_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    allowed_dir = tmp_path / "allowed"
    (allowed_dir / "sub").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (allowed_dir / "escape").symlink_to(tmp_path / "secret")
    allowed = [allowed_dir.as_uri()]

    sub = allowed_dir / "sub"
    expected = SourceLocation(sub.as_uri(), sub.as_uri(), "")
    assert parse_source_uri(str(sub), allowed) == expected
    assert parse_source_uri(sub.as_uri(), allowed) == expected
    assert parse_source_uri(str(allowed_dir) + "/", allowed).uri == allowed_dir.as_uri()
    monkeypatch.chdir(tmp_path)
    assert parse_source_uri("allowed/sub", allowed) == expected
    assert parse_source_uri("allowed/sub", [str(allowed_dir)]) == expected  # bare path allowed

    for bad in (
        str(tmp_path / "secret"),
        str(allowed_dir / ".." / "secret"),
        str(allowed_dir / "escape"),  # a symlink out of the allowed folder
        str(tmp_path / "allowed-not"),
        "file://otherhost/x",
    ):
        with pytest.raises(ValueError, match="source: "):
            parse_source_uri(bad, allowed)
    with pytest.raises(ValueError, match="outside"):
        parse_source_uri(str(allowed_dir), ["s3://photos"])


# --- image sources -------------------------------------------------------------------------------

SOURCE_FILES = {
    "b.png": b"b",
    "a.JPG": b"a",
    "sub/c.webp": b"c",
    "sub/d.jpeg": b"d",
    "e.bmp": b"e",
    "notes.txt": b"no",
    ".hidden.png": b"no",
    "pose.json": b"no",
}
SOURCE_KEYS = ["a.JPG", "b.png", "e.bmp", "sub/c.webp", "sub/d.jpeg"]


def test_image_source_local(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for key, data in SOURCE_FILES.items():
        (photos / key).parent.mkdir(parents=True, exist_ok=True)
        (photos / key).write_bytes(data)
    settings = Settings.from_values(home=tmp_path, allowed_source_prefixes=[str(tmp_path)])
    source = open_image_source(str(photos), settings)
    assert isinstance(source, ImageSource)
    assert source.keys() == SOURCE_KEYS
    assert source.read("sub/c.webp") == b"c"
    assert source.url("a.JPG") == (photos / "a.JPG").as_uri()
    with pytest.raises(ValueError):
        source.read("../secret")
    with pytest.raises(NotFound):
        source.read("zzz.png")

    default = Settings.from_values(home=tmp_path)  # only the output folder itself
    with pytest.raises(ValueError, match="outside"):
        open_image_source(str(photos), default)
    outputs = tmp_path / "outputs" / "uploads"
    outputs.mkdir(parents=True)
    (outputs / "x.png").write_bytes(b"x")
    assert open_image_source(str(outputs), default).keys() == ["x.png"]


def test_image_source_s3(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    client = s3_server.client()
    for key, data in SOURCE_FILES.items():
        client.put_object(Bucket=s3_bucket, Key=f"photos/{key}", Body=data)
    client.put_object(Bucket=s3_bucket, Key="photos-extra/z.png", Body=b"z")
    # without prefixes only the output location is readable, not the rest of its bucket
    alone = s3_server.settings(tmp_path, storage_url=f"s3://{s3_bucket}/outputs")
    with pytest.raises(ValueError, match="outside"):
        open_image_source(f"s3://{s3_bucket}/photos/", alone)
    settings = s3_server.settings(
        tmp_path,
        storage_url=f"s3://{s3_bucket}/outputs",
        allowed_source_prefixes=[f"s3://{s3_bucket}/photos"],
    )
    source = open_image_source(f"s3://{s3_bucket}/photos/", settings)
    assert source.location.prefix == "photos/"
    assert source.keys() == SOURCE_KEYS
    assert source.read("sub/d.jpeg") == b"d"
    assert source.url("b.png") == f"s3://{s3_bucket}/photos/b.png"
    with pytest.raises(ValueError, match="outside"):
        open_image_source("s3://someone-elses-bucket/photos/", settings)
    with pytest.raises(ValueError, match="scheme 'https'"):
        open_image_source(f"https://{s3_bucket}.s3.amazonaws.com/photos/", settings)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_iter_keys_pages_cover_every_key_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    storage: Storage
    if backend == "local":
        storage = LocalStorage(tmp_path / "root")
    else:
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        storage = S3Storage(bucket, "p", client=server.client())
    keys = ["a/x.png", "a/x/y.png", "a/x0.png", "a/z.png", "b.png", "a.png"]
    for key in keys:
        storage.put_bytes(key, b"1")
    listed = list(storage.iter_keys("a/"))
    assert sorted(listed) == sorted(k for k in keys if k.startswith("a/"))
    if backend == "local":  # byte order, as AWS S3 lists (SeaweedFS lists folder by folder)
        assert listed == sorted(listed)
    pages, after = [], ""
    while page := storage.page("", 2, start_after=after):
        pages.append(page)
        after = page[-1]
    assert [len(p) for p in pages] == [2, 2, 2]
    assert sorted(k for p in pages for k in p) == sorted(keys)


# --- streamed uploads (open_upload) --------------------------------------------------------------


def _temp_files(storage: Storage) -> list[Path]:
    """A local store's leftover temporary files (listings skip them)."""
    if not isinstance(storage, LocalStorage) or not storage.root.exists():
        return []
    return [p for p in storage.root.rglob("*") if p.name.startswith(".dpig-tmp-")]


def _wait_for_multipart_upload(storage: S3Storage) -> dict[str, Any]:
    """The one multipart upload in progress, once the background thread has created it."""
    deadline = time.monotonic() + 10
    while not (uploads := multipart_uploads(storage)):
        assert time.monotonic() < deadline, "no multipart upload was created"
        time.sleep(0.05)
    (upload,) = uploads
    return upload


def test_upload_is_invisible_until_finished(storage: Storage) -> None:
    data = bytes(range(256)) * 400
    with storage.open_upload("shards/000000.tar") as upload:
        for start in range(0, len(data), 1000):
            upload.write(data[start : start + 1000])
        assert not storage.exists("shards/000000.tar")
        assert storage.list() == []
        upload.finish()
    assert storage.get_bytes("shards/000000.tar") == data
    assert storage.list() == ["shards/000000.tar"]
    assert _temp_files(storage) == [] and multipart_uploads(storage) == []


def test_upload_replaces_an_object_whole(storage: Storage) -> None:
    storage.put_bytes("k.tar", b"old" * 1000)
    with storage.open_upload("k.tar") as upload:
        upload.write(b"new")
        assert storage.get_bytes("k.tar") == b"old" * 1000
        upload.finish()
    assert storage.get_bytes("k.tar") == b"new"


def test_upload_aborted_or_left_unfinished_leaves_nothing(storage: Storage) -> None:
    upload = storage.open_upload("a.tar")
    upload.write(b"x" * 5000)
    upload.abort()
    upload.abort()  # idempotent
    with pytest.raises(ValueError, match="aborted"):
        upload.write(b"more")
    with storage.open_upload("b.tar") as unfinished:
        unfinished.write(b"y" * 5000)
    assert unfinished.aborted
    with pytest.raises(RuntimeError), storage.open_upload("c.tar") as failing:
        failing.write(b"z")
        raise RuntimeError("the chunk failed")
    assert storage.list() == []
    assert _temp_files(storage) == [] and multipart_uploads(storage) == []


def test_upload_abort_after_finish_keeps_the_object(storage: Storage) -> None:
    upload = storage.open_upload("k.bin")
    upload.write(b"kept")
    upload.finish()
    upload.abort()
    assert storage.get_bytes("k.bin") == b"kept"
    with pytest.raises(ValueError, match="finished"):
        upload.finish()


def test_local_upload_is_0644_and_leaves_no_temp_file(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    with store.open_upload("jobs/j/shards/000000.tar") as upload:
        upload.write(b"tar")
        (temp,) = _temp_files(store)
        assert temp.parent == tmp_path / "jobs" / "j" / "shards"  # renamed within its folder
        upload.finish()
    assert (tmp_path / "jobs/j/shards/000000.tar").stat().st_mode & 0o777 == 0o644
    assert _temp_files(store) == []


def test_s3_upload_in_parts_while_writing(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    store = parts_storage(s3_client(s3_server.settings(tmp_path)), s3_bucket, "up")
    data = random.Random(1).randbytes(2 * MIN_PART_BYTES + 12345)
    with store.open_upload("shards/000000.tar") as upload:
        for start in range(0, len(data), 100_000):
            upload.write(data[start : start + 100_000])
        # both full parts went up (or are going up) before finish
        assert _wait_for_multipart_upload(store)["Key"] == "up/shards/000000.tar"
        assert not store.exists("shards/000000.tar") and store.list() == []
        upload.finish()
    assert store.get_bytes("shards/000000.tar") == data
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="up/shards/000000.tar")
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentType"] == "application/x-tar"  # as put_file names a .tar
    assert multipart_uploads(store) == []


def test_s3_upload_of_whole_parts(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    store = parts_storage(s3_client(s3_server.settings(tmp_path)), s3_bucket, "up")
    data = random.Random(2).randbytes(2 * MIN_PART_BYTES)
    with store.open_upload("k.bin", content_type="application/octet-stream") as upload:
        upload.write(data)
        upload.finish()
    assert store.get_bytes("k.bin") == data
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="up/k.bin")
    assert head["ETag"].strip('"').endswith("-2")  # the last part is whole, not empty


def test_s3_upload_smaller_than_a_part_is_one_put(
    s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    store = parts_storage(s3_client(s3_server.settings(tmp_path)), s3_bucket, "up")
    data = random.Random(3).randbytes(MIN_PART_BYTES)  # exactly one part: still one put
    with store.open_upload("small.tar") as upload:
        for start in range(0, len(data), 1 << 16):
            upload.write(data[start : start + (1 << 16)])
        time.sleep(0.2)
        assert multipart_uploads(store) == []
        upload.finish()
    assert store.get_bytes("small.tar") == data
    etag = s3_server.client().head_object(Bucket=s3_bucket, Key="up/small.tar")["ETag"]
    assert "-" not in etag  # not a multipart object
    assert multipart_uploads(store) == []


def test_s3_upload_aborted_mid_way_leaves_nothing(
    s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    store = parts_storage(s3_client(s3_server.settings(tmp_path)), s3_bucket, "up")
    with store.open_upload("shards/000001.tar") as upload:
        upload.write(random.Random(4).randbytes(2 * MIN_PART_BYTES + 1))
        _wait_for_multipart_upload(store)
    assert upload.aborted
    assert multipart_uploads(store) == []
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_s3_failed_part_is_a_storage_error(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    store = parts_storage(s3_client(s3_server.settings(tmp_path)), s3_bucket, "up")
    client = s3_server.client()
    piece = random.Random(5).randbytes(MIN_PART_BYTES + 1)
    upload = store.open_upload("shards/000002.tar")
    upload.write(piece)  # the first part goes up
    gone = _wait_for_multipart_upload(store)
    # the upload disappears behind the writer's back: later parts get NoSuchUpload
    client.abort_multipart_upload(Bucket=s3_bucket, Key=gone["Key"], UploadId=gone["UploadId"])
    with pytest.raises(StorageError, match="s3://.*/up/shards/000002.tar"):
        for _ in range(3):
            upload.write(piece)
        upload.finish()
    assert upload.aborted
    upload.abort()  # already done: nothing more to do
    assert multipart_uploads(store) == []
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_s3_upload_to_an_unreachable_endpoint_is_a_storage_error(tmp_path: Path) -> None:
    settings = Settings.from_values(
        home=tmp_path, s3_endpoint_url="http://127.0.0.1:9", s3_region="us-east-1",
        aws_access_key_id="k", aws_secret_access_key="s", s3_max_attempts=2,
    )  # fmt: skip
    store = S3Storage("bucket-a", client=s3_client(settings), part_bytes=MIN_PART_BYTES)
    with store.open_upload("big.tar") as upload, pytest.raises(StorageError, match="big.tar"):
        upload.write(b"x" * (MIN_PART_BYTES + 1))  # creating the multipart upload fails
        upload.finish()
    assert upload.aborted
    with store.open_upload("small.tar") as upload, pytest.raises(StorageError, match="small"):
        upload.write(b"x")
        upload.finish()


def test_s3_part_size_below_the_minimum_is_refused(s3_server, tmp_path: Path) -> None:
    client = s3_client(s3_server.settings(tmp_path))
    store = S3Storage("bucket-a", client=client, part_bytes=MIN_PART_BYTES - 1)
    with pytest.raises(ValueError, match="part_bytes"):
        store.open_upload("k")
