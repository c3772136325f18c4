"""Shards from anywhere: a shards location is a folder path or a URL, and this is the one home of
everything remote (where a location points, requests, retries, verification, the cache).

Locations (`parse_location`): a path, `file:///abs/path` (a path), `http://` and `https://`
(the standard library's urllib: Range requests are one header, proxies and TLS come from the
environment as for any Python program, and no dependency is added), `s3://bucket/prefix`
(boto3, the optional extra `handpose[s3]`: the standard AWS configuration (environment,
~/.aws, instance roles) and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for S3-compatible stores;
boto3 rather than fsspec + s3fs because one ranged GET with a streaming body is all that is
needed, and s3fs adds an async stack and read caches of its own under the retries and cache here).

Reading a remote pack (`Store`, made by `open_manifest` from the manifest, which is read first
and checked as a local one is):
- without a cache, each read streams the byte range the `.idx` says the wanted samples occupy,
  widened to the manifest's blocks (format v3 records a sha256 per `block_bytes` of each tar);
  every block is checked as it arrives and no sample is handed on before its blocks matched, so
  nothing unverified ever reaches a batch. A v2 pack has one digest per tar and is read from a URL
  only through a cache;
- with a cache (`Cache`), each tar and its index are fetched whole into the cache folder (sha256
  checked while streaming, then stamped (`stamp`) and renamed into place), once per node (a lock
  per file), and read from there like a local pack. A cached file written to since it was
  stamped has its blocks checked as they are read, and a cached file of the wrong size or hash
  is fetched again. The DALI kind reads these local copies.
- transient failures (connection reset or refused, timeouts, HTTP 408/429/5xx, a body cut
  short) are retried with exponential backoff, each retry resuming from the byte where the last
  one stopped (HTTP Range / S3 ranged GET); `Retry.attempts` failures in a row without progress
  end in one line naming the URL and the last failure. 401/403/404/416 are not retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import http.client
import json
import math
import os
import random
import re
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handpose.errors import ConfigError, HandposeError
from handpose.shards import (
    MANIFEST,
    REPACK,
    IndexEntry,
    Manifest,
    Sample,
    block_span,
    cached_index,
    index_name,
    manifest_from,
    parse_index,
    read_samples,
    sha256_problem,
)

URL_SCHEMES = ("http", "https", "s3")
CHUNK = 1 << 20  # bytes asked of a response body per read
RECENT_BLOCKS = 8  # verified blocks kept per process: a run of one-sample reads fetches each once
REUPLOAD = "re-upload the pack or re-run handpose pack"
EVICTED = "evicted from the cache as fast as it is fetched; raise --cache-limit"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ENTRY = re.compile(r"[0-9a-f]{64}\.(tar|idx)")  # the only names the cache ever deletes


# ---- locations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Url:
    """A remote location (http, https or s3) without a trailing slash; `url / name` joins a name."""

    text: str

    def __truediv__(self, name: str) -> Url:
        return Url(f"{self.text}/{name}")

    def __str__(self) -> str:
        return self.text

    @property
    def scheme(self) -> str:
        return self.text.partition("://")[0].lower()

    @property
    def name(self) -> str:
        return self.text.rsplit("/", 1)[-1]


Location = Path | Url


def parse_location(value: str | os.PathLike | Url) -> Location:
    """A path (or a file:// URL) -> Path; an http(s):// or s3:// URL -> Url; another scheme, or a
    URL without a host or bucket -> HandposeError naming it."""
    if isinstance(value, (Path, Url)):
        return value
    text = os.fspath(value)
    match = _SCHEME.match(text)
    if match is None:
        return Path(text)
    scheme = match.group(1).lower()
    parts = urllib.parse.urlsplit(text)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise HandposeError(f"{text}: a file:// URL names a path on this machine (file:///path)")
        return Path(urllib.parse.unquote(parts.path))
    if scheme not in URL_SCHEMES:
        raise HandposeError(
            f"{text}: unsupported location {scheme}:// (expected a path, file://, http://, https:// or s3://)"
        )
    if not parts.netloc:
        raise HandposeError(f"{text}: no {'bucket' if scheme == 's3' else 'host'} in the URL")
    return Url(text.rstrip("/"))


def is_url(value: object) -> bool:
    """Whether `value` is a remote location (an http, https or s3 URL, as text or Url)."""
    if isinstance(value, Url):
        return True
    match = _SCHEME.match(value) if isinstance(value, str) else None
    return match is not None and match.group(1).lower() in URL_SCHEMES


def location_name(value: str | os.PathLike | Url) -> str:
    """The last part of a location: a folder's name, or a URL's last path segment (the bucket for
    a bare s3://bucket)."""
    loc = parse_location(value)
    if isinstance(loc, Url):
        return loc.name
    return loc.resolve().name


# ---- requests, retried and resumed --------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    """How transient failures are retried: `attempts` tries in a row without a byte of progress,
    waiting backoff_s, 2 x backoff_s, ... (at most max_backoff_s, each x a random 0.5..1 so ranks
    do not retry in step); a connection or read that waits `timeout_s` for bytes has failed (a
    slow server that keeps sending never does)."""

    attempts: int = 8
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


RETRY = Retry()


class _Transient(Exception):
    """A failure worth another try; the message says what happened (the last one is reported)."""


class NotFound(HandposeError):
    """The server has no such file (HTTP 404, S3 NoSuchKey): never retried."""


_TRANSIENT_HTTP = {408, 425, 429}


def _status_error(url: Url, status: int, reason: str) -> Exception:
    """The exception for an HTTP status: transient (408, 425, 429, 5xx) or one line naming the URL."""
    if status in _TRANSIENT_HTTP or status >= 500:
        return _Transient(f"HTTP {status} {reason}".rstrip())
    if status == 404:
        return NotFound(f"{url}: not found (HTTP 404)")
    if status in (401, 403):
        return HandposeError(f"{url}: access denied (HTTP {status})")
    if status == 416:
        return HandposeError(f"{url}: shorter than the manifest says (HTTP 416); {REUPLOAD}")
    return HandposeError(f"{url}: HTTP {status} {reason}".rstrip())


class _Body:
    """An open response body positioned at byte `start`, ending at byte `end` (exclusive; None:
    unknown, read to the end of the stream)."""

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None], end: int | None):
        self.read, self.close, self.end = read, close, end


def _http_open(url: Url, start: int, stop: int | None, timeout: float) -> _Body:
    headers = {"User-Agent": "handpose"}
    if start or stop is not None:
        headers["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url.text, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        raise _status_error(url, e.code, str(e.reason)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Transient(_why(e)) from None
    length = resp.headers.get("Content-Length")
    end = None if length is None else int(length)
    if resp.status == 206:
        got = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if got is None or int(got.group(1)) != start:
            resp.close()
            raise _Transient(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
        end = int(got.group(2)) + 1
    elif start:  # the server ignored the Range header: skip to `start`
        skip = start
        while skip:
            n = len(resp.read(min(CHUNK, skip)))
            if not n:
                resp.close()
                raise _Transient(f"connection closed at byte {start - skip}")
            skip -= n
    return _Body(resp.read, resp.close, end)


@functools.lru_cache(maxsize=4)
def _s3_client(pid: int, timeout: float, aws_env: tuple[tuple[str, str], ...]) -> Any:
    """One boto3 S3 client per process (`pid`: a forked loader worker makes its own; clients are
    not shared across fork) and AWS_* environment (endpoint, profile, region, keys). boto3's own
    retries are off: `Retry` is the one policy, and it resumes."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", config=Config(retries={"total_max_attempts": 1}, connect_timeout=timeout, read_timeout=timeout)
    )


def _aws_env() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


def _s3_open(url: Url, start: int, stop: int | None, timeout: float) -> _Body:
    try:
        import boto3  # noqa: F401  (the client, made in _s3_client)
        import botocore.exceptions as bx
    except ImportError:
        raise HandposeError(f"{url}: s3:// locations need boto3: pip install 'handpose[s3]'") from None
    bucket, _, key = url.text.partition("://")[2].partition("/")
    args: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if start or stop is not None:
        args["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
    try:
        resp = _s3_client(os.getpid(), timeout, _aws_env()).get_object(**args)
    except bx.NoCredentialsError:
        raise HandposeError(
            f"{url}: no AWS credentials (set them in the environment, ~/.aws or an instance role)"
        ) from None
    except bx.ClientError as e:
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        raise _status_error(url, status, str(e.response.get("Error", {}).get("Code", ""))) from None
    except (bx.BotoCoreError, OSError) as e:
        raise _Transient(_why(e)) from None
    body = resp["Body"]
    return _Body(body.read, body.close, start + int(resp["ContentLength"]))


def _transient_errors() -> tuple[type[BaseException], ...]:
    """What a body read raises when the connection fails (urllib3 and botocore when installed)."""
    kinds: list[type[BaseException]] = [OSError, http.client.HTTPException]
    with contextlib.suppress(ImportError):
        import urllib3.exceptions

        kinds.append(urllib3.exceptions.HTTPError)
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        kinds.append(botocore.exceptions.BotoCoreError)
    return tuple(kinds)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {getattr(e, 'reason', None) or e}".rstrip(": ")


def stream(
    url: Url, start: int = 0, stop: int | None = None, retry: Retry = RETRY, *, chunk: int = CHUNK
) -> Iterator[bytes]:
    """Bytes [start, stop) of `url` in chunks of `chunk` bytes (the last and any cut short by a
    failure smaller; stop None: to its end). A transient failure waits
    and resumes from the next byte not yet yielded; `retry.attempts` failures in a row without
    progress raise HandposeError naming the URL and the last failure."""
    opener = _s3_open if url.scheme == "s3" else _http_open
    transient = _transient_errors()
    pos, end, failures = start, stop, 0
    while end is None or pos < end:
        try:
            body = opener(url, pos, end, retry.timeout_s)
            if stop is not None and body.end is not None and body.end < stop:
                body.close()
                raise HandposeError(
                    f"{url}: {body.end} bytes, the manifest says more (truncated or changed since packing); "
                    f"{REUPLOAD}"
                )
            end = body.end if end is None else end
            try:
                while end is None or pos < end:
                    try:
                        data = body.read(chunk if end is None else min(chunk, end - pos))
                    except transient as e:
                        raise _Transient(_why(e)) from None
                    if not data:
                        if end is None:
                            return
                        raise _Transient(f"connection closed at byte {pos} of {end}")
                    pos += len(data)
                    failures = 0
                    yield data
            finally:
                body.close()
        except _Transient as e:
            failures += 1
            if failures >= retry.attempts:
                raise HandposeError(f"{url}: {e} (tried {failures} times; stopped at byte {pos})") from None
            time.sleep(retry.delay(failures))


def fetch_bytes(url: Url, retry: Retry = RETRY, size: int | None = None) -> bytes:
    """The whole of a small file (a manifest, an index), retried and resumed like `stream`."""
    return b"".join(stream(url, 0, size, retry))


def download(url: Url, part: Path, size: int, retry: Retry = RETRY) -> str:
    """Append the bytes of `url` to `part` from its current length up to `size` (a partial file
    left by an interrupted run is continued) and return the sha256 of all `size` bytes."""
    have = _size(part) or 0
    have = have if have <= size else 0
    h = hashlib.sha256()
    with open(part, "r+b" if have else "wb") as f:
        left = have
        while left and (data := f.read(min(CHUNK, left))):
            h.update(data)
            left -= len(data)
        f.seek(have)
        f.truncate()
        for chunk in stream(url, have, size, retry):
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


# ---- the manifest of a remote pack --------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """What a file must be: its size and sha256, and the sha256 of each `block_bytes` of it (the
    last block shorter); a v2 tar is one block, the whole file."""

    size: int
    sha256: str
    block_bytes: int = 0
    blocks: tuple[str, ...] = ()

    def block_range(self, k: int) -> tuple[int, int]:
        return block_span(k, self.block_bytes, self.size)


def open_manifest(root: Url, *, cache: Cache | None = None, retry: Retry = RETRY) -> Manifest:
    """The manifest of the pack at `root`, read and checked as a local one (`shards.manifest_from`),
    with the `Store` that reads its shards."""
    url = root / MANIFEST
    try:
        raw = fetch_bytes(url, retry)
    except NotFound:
        raise HandposeError(
            f"{root}: no {MANIFEST} (not a packed shards folder, or packing did not finish)"
        ) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HandposeError(f"{url}: unreadable manifest: {e}") from None
    manifest = manifest_from(data, str(url), root)
    store = _OPENED[root.text] = Store.of(root, manifest.data, cache, retry)
    return dataclasses.replace(manifest, store=store)


def store_of(tar_url: str) -> Store:
    """The Store of the pack that the shard at `tar_url` belongs to: the one this process opened
    its manifest with (and its cache), else the manifest opened now, without a cache. (predict
    reads an image again by its shard URL alone.)"""
    root = tar_url.rsplit("/", 1)[0]
    if root not in _OPENED:
        open_manifest(Url(root))
    return _OPENED[root]


_OPENED: dict[str, Store] = {}  # root URL -> the Store its manifest was last opened with, here


# ---- the cache ----------------------------------------------------------------------------------

_LOCKS = ".locks"


@contextlib.contextmanager
def _locked(path: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """An advisory lock (flock) on `path`, held inside the block; yields False when `wait` is
    False and another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Cache:
    """A folder of verified copies of remote shards: DIR/{sha256 of the tar}.tar and .idx beside it.

    Safe to share between the processes of a node: a file is downloaded under its own lock (one
    download per file per node; the others wait, then read it), to a `.part` name renamed into
    place once its sha256 matched (a `.part` left by a crash is continued). A file whose size is
    wrong is fetched again; `limit` (bytes) bounds the folder, least recently used files out
    (files being read are skipped). Only names this cache writes are ever deleted."""

    folder: Path
    limit: int | None = None

    def fetch(self, url: Url, key: str, suffix: str, info: FileInfo, retry: Retry = RETRY) -> Path:
        """The cached copy of `url` (`info`: its size and sha256), named `key + suffix`."""
        path = self.folder / f"{key}{suffix}"
        if _size(path) != info.size:
            with _locked(self._lock(path)):
                if _size(path) != info.size:  # missing, or a wrong size: fetch (again)
                    path.unlink(missing_ok=True)
                    part = self.folder / f".{path.name}.part"
                    if download(url, part, info.size, retry) != info.sha256:
                        part.unlink()
                        raise HandposeError(f"{url}: {sha256_problem()}; {REUPLOAD}")
                    os.utime(part, ns=(time.time_ns(), stamp(info.sha256)))  # verified, as written
                    os.replace(part, path)
            self._evict(keep=key)
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: the reader fetches it again
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))  # access time orders eviction
        return path

    def discard(self, path: Path) -> None:
        """Remove a damaged copy (it is fetched again on its next use)."""
        with _locked(self._lock(path)):
            path.unlink(missing_ok=True)

    def reading(self, path: Path) -> contextlib.AbstractContextManager[bool]:
        """Held while a copy is read: eviction skips it."""
        return _locked(self._lock(path), shared=True)

    def _lock(self, path: Path) -> Path:
        return self.folder / _LOCKS / path.name

    def _evict(self, keep: str) -> None:
        if self.limit is None:
            return
        files = []
        for p in self.folder.iterdir():
            if _ENTRY.fullmatch(p.name) and not p.name.startswith(keep):
                with contextlib.suppress(FileNotFoundError):
                    files.append((p.stat().st_atime_ns, p))
        total = sum(_size(p) or 0 for p in self.folder.iterdir() if _ENTRY.fullmatch(p.name))
        for _, p in sorted(files):
            if total <= self.limit:
                break
            with _locked(self._lock(p), wait=False) as free:
                if free and (size := _size(p)) is not None:
                    p.unlink()
                    total -= size


def parse_size(text: str) -> int:
    """'500M', '50G', '1.5T', '2GiB', '1000' -> bytes (K/M/G/T = 1000^n, KiB/MiB/GiB/TiB = 1024^n);
    ValueError for anything else."""
    got = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if got is None or (got.group(3) and not got.group(2)):
        raise ValueError(f"{text!r} is not a size (e.g. 500M, 50G, 2TiB)")
    power = "KMGT".find(got.group(2).upper()) + 1 if got.group(2) else 0
    return int(float(got.group(1)) * (1024 if got.group(3) else 1000) ** power)


def make_cache(
    folder: str | os.PathLike | None,
    limit: str | int | None = None,
    *,
    keys: tuple[str, str] = ("--cache", "--cache-limit"),
) -> Cache | None:
    """A Cache from a cache folder and a size bound (None/'' folder: no cache); the one check of
    both (ConfigError naming `keys`: the flags, or train's recipe keys cache_dir, cache_limit)."""
    folder_key, limit_key = keys
    if folder is None or str(folder) == "":
        if limit not in (None, ""):
            raise ConfigError((limit_key, folder_key), f"give {folder_key} too (the folder it bounds)")
        return None
    if isinstance(limit, str):
        try:
            limit = parse_size(limit) if limit.strip() else None
        except ValueError as e:
            raise ConfigError(limit_key, str(e)) from None
    if is_url(str(folder)):
        raise ConfigError(folder_key, f"{folder} must be a folder on this machine")
    return Cache(Path(folder), limit)


# ---- reading a remote pack ----------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """How to read the shards of the pack at `root` (picklable: loader workers carry it): what
    each tar and index must be (from the manifest), the cache if any, and the retry policy."""

    root: Url
    tars: dict[str, FileInfo]  # by tar name
    indexes: dict[str, FileInfo]  # by tar name: its .idx (absent when the manifest has no digest)
    version: int
    cache: Cache | None = None
    retry: Retry = RETRY

    @staticmethod
    def of(root: Url, data: dict[str, Any], cache: Cache | None, retry: Retry = RETRY) -> Store:
        tars, indexes = {}, {}
        for e in data["shards"]:
            if "block_sha256" in e:
                tars[e["name"]] = FileInfo(
                    e["bytes"], e["sha256"], e["block_bytes"], tuple(e["block_sha256"])
                )
            else:  # v2: the whole tar is the one block there is a digest for
                tars[e["name"]] = FileInfo(e["bytes"], e["sha256"], max(e["bytes"], 1), (e["sha256"],))
            if "index_sha256" in e:
                indexes[e["name"]] = FileInfo(e["index_bytes"], e["index_sha256"])
        return Store(root, tars, indexes, int(data["format_version"]), cache, retry)

    def check(self, names: Sequence[str]) -> None:
        """Refuse before reading what cannot be read safely (one line): a v2 pack without a cache,
        a shard whose index has no digest, a cache limit below the largest shard."""
        if self.cache is None and self.version < 3:
            raise HandposeError(
                f"{self.root}: a format v2 pack has one sha256 per tar, so it is read from a URL only "
                "through a cache (--cache DIR); re-pack it (format v3) to stream it"
            )
        for name in names:
            if name not in self.indexes:
                raise HandposeError(f"{self.root / name}: the manifest records no index digest; {REPACK}")
        if self.cache is not None and self.cache.limit is not None and names:
            big = max(names, key=lambda n: self.tars[n].size + self.indexes[n].size)
            need = self.tars[big].size + self.indexes[big].size
            if need > self.cache.limit:
                raise HandposeError(
                    f"--cache-limit {self.cache.limit} bytes: smaller than {self.root / big} and its "
                    f"index ({need} bytes)"
                )

    def read_samples(self, name: str, exts: Sequence[str], start: int, stop: int | None) -> Iterator[Sample]:
        """Samples [start, stop) of tar `name`, as `shards.read_samples` gives them locally (with
        `__url__` the tar's URL), each only after the bytes it came from matched the manifest."""
        if self.cache is not None:
            yield from self._cached_samples(name, exts, start, stop)
            return
        self.check([name])
        url, info = self.root / name, self.tars[name]
        entries = self.index(name)[start:stop]
        span = _span(entries, exts)
        blocks = _verified_blocks(url, info, *_blocks_of(span, info), self.retry) if span else iter(())
        window: dict[int, bytes] = {}
        for key, members in entries:
            sample: Sample = {"__key__": key, "__url__": str(url)}
            for ext in exts:
                if ext in members:
                    offset, size = members[ext]
                    last = (offset + max(size, 1) - 1) // info.block_bytes
                    while last not in window:
                        k, data = next(blocks)
                        window[k] = data
                    sample[ext] = _slice(window, info.block_bytes, offset, size)
            end = max((o + n for e, (o, n) in members.items() if e in exts), default=0)
            for k in [k for k in window if (k + 1) * info.block_bytes <= end]:
                del window[k]  # every later member lies past `end`
            yield sample

    def index(self, name: str) -> list[IndexEntry]:
        """The parsed index of tar `name` (its sha256 checked): from the cache, else fetched once
        per process."""
        if self.cache is not None:
            entries = cached_index(str(self.local_pair(name)[1]))
            if entries is None:  # evicted by another process since it was fetched
                raise HandposeError(f"{self.root / name}: {EVICTED}")
            return entries
        return _fetched_index(self.root / index_name(name), self.indexes[name], self.retry)

    def local_pair(self, name: str) -> tuple[Path, Path]:
        """The cached tar and index of `name`, fetched when missing or of the wrong size."""
        assert self.cache is not None  # callers check: only a Store with a cache has local files
        tar, idx = self.tars[name], self.indexes[name]
        path = self.cache.fetch(self.root / name, tar.sha256, ".tar", tar, self.retry)
        self.cache.fetch(self.root / index_name(name), tar.sha256, ".idx", idx, self.retry)
        return path, path.with_suffix(".idx")

    def local_files(self, names: Sequence[str]) -> list[str]:
        """Local copies of whole tars (the DALI kind reads files): every block checked."""
        if self.cache is None:
            raise HandposeError(
                f"{self.root}: the DALI loader reads local files only; give --cache DIR (filled "
                "before the first batch) or use --loader wds"
            )
        self.check(names)
        out = []
        for name in names:
            out.append(str(self._checked_copy(name, range(len(self.tars[name].blocks)))))
        return out

    def _checked_copy(self, name: str, blocks: range) -> Path:
        """The cached tar of `name` whose `blocks` matched the manifest; a damaged copy is
        fetched again (once: a second mismatch means the manifest disagrees with itself)."""
        assert self.cache is not None
        info = self.tars[name]
        for _ in range(2):
            path, _ = self.local_pair(name)
            bad = _bad_block(path, info, blocks)
            if bad is None:
                return path
            self.cache.discard(path)
        raise HandposeError(
            f"{self.root / name}: the manifest's block sha256s disagree with its sha256; {REPACK}"
        )

    def _cached_samples(
        self, name: str, exts: Sequence[str], start: int, stop: int | None
    ) -> Iterator[Sample]:
        assert self.cache is not None
        self.check([name])
        info, url = self.tars[name], str(self.root / name)
        entries = self.index(name)[start:stop]
        span = _span(entries, exts)
        blocks = range(*_blocks_of(span, info)) if span else range(0)
        for _ in range(3):
            path = self._checked_copy(name, blocks)
            with self.cache.reading(path):
                if _size(path) != info.size:  # evicted by another process meanwhile: fetch again
                    continue
                for sample in read_samples(path, exts, start, stop):
                    sample["__url__"] = url
                    yield sample
                return
        raise HandposeError(f"{url}: {EVICTED}")


def _span(entries: Sequence[IndexEntry], exts: Sequence[str]) -> tuple[int, int] | None:
    """The bytes [lo, hi) of a tar that hold the members `exts` of `entries` (None: no such member)."""
    ranges = [(o, o + n) for _, members in entries for e, (o, n) in members.items() if e in exts]
    if not ranges:
        return None
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def _blocks_of(span: tuple[int, int], info: FileInfo) -> tuple[int, int]:
    """The blocks [k0, k1) that cover the byte span."""
    lo, hi = span
    return lo // info.block_bytes, max(math.ceil(hi / info.block_bytes), lo // info.block_bytes + 1)


def _slice(window: dict[int, bytes], block: int, offset: int, size: int) -> bytes:
    k, at = divmod(offset, block)
    if at + size <= block:
        return window[k][at : at + size]
    parts, need = [], size
    while need > 0:
        piece = window[k][at : at + need]
        parts.append(piece)
        need -= len(piece)
        k, at = k + 1, 0
    return b"".join(parts)


_RECENT: OrderedDict[str, bytes] = OrderedDict()  # a block's sha256 -> its verified bytes
_RECENT_LOCK = threading.Lock()  # predict reads images from a pool of threads
HASH_BLOCKS = True  # False only in `handpose bench loader`, to measure what the checks cost


def _verified_blocks(url: Url, info: FileInfo, k0: int, k1: int, retry: Retry) -> Iterator[tuple[int, bytes]]:
    """Blocks k0..k1-1 of `url`, each checked against the manifest before it is yielded; the
    blocks not recently verified in this process are streamed in one ranged request."""
    k = k0
    while k < k1:
        with _RECENT_LOCK:
            recent = _RECENT.get(info.blocks[k])
            if recent is not None:
                _RECENT.move_to_end(info.blocks[k])
        if recent is not None:
            yield k, recent
            k += 1
            continue
        parts: list[bytes] = []  # received, not yet a whole block (the chunks are blocks unless a
        have = 0  # connection dropped mid-block: then no copies are made)
        lo, hi = info.block_range(k)[0], info.block_range(k1 - 1)[1]
        for chunk in stream(url, lo, hi, retry, chunk=info.block_bytes):
            parts.append(chunk)
            have += len(chunk)
            while k < k1 and have >= (n := info.block_range(k)[1] - info.block_range(k)[0]):
                joined = parts[0] if len(parts) == 1 else b"".join(parts)
                data, rest = (joined, b"") if len(joined) == n else (joined[:n], joined[n:])
                parts, have = ([rest] if rest else []), len(rest)
                if HASH_BLOCKS and hashlib.sha256(data).hexdigest() != info.blocks[k]:
                    raise HandposeError(f"{url}: {sha256_problem(info.block_range(k))}; {REUPLOAD}")
                with _RECENT_LOCK:
                    _RECENT[info.blocks[k]] = data
                    while len(_RECENT) > RECENT_BLOCKS:
                        _RECENT.popitem(last=False)
                yield k, data
                k += 1


_CHECKED: dict[str, tuple[tuple[int, int, int], set[int]]] = {}  # path -> (file identity, blocks)


def stamp(sha256: str) -> int:
    """The modification time (ns) the cache gives a file it has verified: derived from its
    sha256, so a file still carrying it has not been written to since (any write sets the
    modification time to now) and need not be hashed again."""
    return int(sha256[:12], 16)


def _bad_block(path: Path, info: FileInfo, blocks: range) -> int | None:
    """The first of `blocks` of the cached file whose sha256 differs from the manifest's, else
    None. A file that still carries its `stamp` was verified whole when the cache wrote it;
    otherwise each block is hashed once per process while the file stays the same (inode,
    size, modification time)."""
    st = path.stat()
    if st.st_mtime_ns == stamp(info.sha256):
        return None
    ident = (st.st_ino, st.st_size, st.st_mtime_ns)
    known, done = _CHECKED.get(str(path), (ident, set()))
    done = done if known == ident else set()
    _CHECKED[str(path)] = (ident, done)
    with open(path, "rb", buffering=0) as f:
        for k in blocks:
            if k in done or not HASH_BLOCKS:
                continue
            lo, hi = info.block_range(k)
            f.seek(lo)
            h = hashlib.sha256()
            while lo < hi and (data := f.read(min(4 * CHUNK, hi - lo))):
                h.update(data)
                lo += len(data)
            if h.hexdigest() != info.blocks[k]:
                return k
            done.add(k)
    return None


@functools.lru_cache(maxsize=1024)
def _fetched_index(url: Url, info: FileInfo, retry: Retry) -> list[IndexEntry]:
    raw = fetch_bytes(url, retry, info.size)
    if hashlib.sha256(raw).hexdigest() != info.sha256:
        raise HandposeError(f"{url}: {sha256_problem()}; {REUPLOAD}")
    try:
        return parse_index(raw.decode("ascii"), str(url))
    except UnicodeDecodeError:
        raise HandposeError(f"{url}: not a DALI index (not ASCII text); {REPACK}") from None


# ---- a whole pack, one shard at a time (handpose verify) ---------------------------------------


@contextlib.contextmanager
def shard_folder(manifest: Manifest, entry: dict[str, Any]) -> Iterator[Path]:
    """A folder holding the shard `entry` and its index as files: the pack's own folder, or for a
    remote pack a temporary one they are downloaded into (unchecked: the caller checks; a file
    the server does not have is left out) and that is removed afterwards."""
    if isinstance(manifest.root, Path):
        yield manifest.root
        return
    store = manifest.store
    retry = store.retry if store is not None else RETRY
    with tempfile.TemporaryDirectory(prefix="handpose-verify-") as tmp:
        for name in (entry["name"], entry["index"]):
            try:
                with open(Path(tmp) / name, "wb") as f:
                    for chunk in stream(manifest.root / name, 0, None, retry):
                        f.write(chunk)
            except NotFound:
                (Path(tmp) / name).unlink()
        yield Path(tmp)
