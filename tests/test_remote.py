"""Shards from URLs (remote.py) against real servers on 127.0.0.1: a Range-capable HTTP server
with planted faults (remotekit.FileServer) and moto's S3 server. Reads over a URL give the same
samples as the local folder; faults are retried, resumed or refused as the issue says; the cache
is filled once per node and repairs itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import remotekit
import torch
from predictkit import WARP, IntensityModel
from remotekit import FAST, serving
from shardkit import chunk, hand_dots_pack, photo_samples, texture_sample, write_pack

from handpose import remote
from handpose.config import LayoutConfig
from handpose.errors import HandposeError
from handpose.inspector import inspect_shards
from handpose.loader import make_loader
from handpose.predict import predict
from handpose.remote import REUPLOAD, Cache, Url, parse_location, parse_size
from handpose.shards import MANIFEST, read_manifest, read_samples, sample_key, split_shards
from handpose.train import train
from handpose.verify import verify

TESTS = Path(__file__).resolve().parent
MEMBERS = ("jpg", "kp.f32", "vis.u8", "box.f32")
BLOCK = 8192  # small blocks, so that a read covers several and starts mid-tar


def _pack(root: Path, seed: int = 0) -> Path:
    """3 train shards of 10 and 2 val shards of 7 + 6 textured samples, 8 KiB blocks."""
    rng = np.random.default_rng(seed)
    samples = [texture_sample(i, rng) for i in range(43)]
    return write_pack(
        root,
        {"train": chunk(samples[:30], [10, 10, 10]), "val": chunk(samples[30:], [7, 6])},
        block_bytes=BLOCK,
    )


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    return _pack(tmp_path / "pack")


@pytest.fixture
def server(pack: Path) -> Iterator[remotekit.FileServer]:
    with serving(pack) as s:
        yield s


def _store(server: remotekit.FileServer, cache: Cache | None = None) -> remote.Store:
    m = remote.open_manifest(Url(server.url()), cache=cache, retry=FAST)
    assert m.store is not None
    return m.store


def _read(store: remote.Store, name: str, start: int = 0, stop: int | None = None) -> list[dict]:
    return list(read_samples(f"{store.root}/{name}", MEMBERS, start, stop, store=store))


def _local(pack: Path, name: str, start: int = 0, stop: int | None = None) -> list[dict]:
    return list(read_samples(pack / name, MEMBERS, start, stop))


def _members(samples: list[dict]) -> list[tuple]:
    return [(s["__key__"], *(s.get(e) for e in MEMBERS)) for s in samples]


# ------------------------------------------------------------------ locations


def test_locations_parse() -> None:
    assert parse_location("data/shards") == Path("data/shards")
    assert parse_location("file:///tmp/a%20b") == Path("/tmp/a b")
    assert parse_location("https://host:8080/p/shards/") == Url("https://host:8080/p/shards")
    assert parse_location("S3://bucket/prefix") == Url("S3://bucket/prefix")
    assert str(Url("s3://b/p") / "x.tar") == "s3://b/p/x.tar"
    with pytest.raises(HandposeError, match=r"ftp://h/x: unsupported location ftp://"):
        parse_location("ftp://h/x")
    with pytest.raises(HandposeError, match="no bucket"):
        parse_location("s3:///prefix")
    assert parse_size("500M") == 500_000_000 and parse_size("2GiB") == 2 << 30 and parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


# ------------------------------------------------------------------ reads, and faults


@pytest.mark.parametrize("span", [(0, None), (2, 8), (9, 10), (0, 1), (5, None)])
def test_ranged_reads_equal_local(pack: Path, server: remotekit.FileServer, span: tuple) -> None:
    """Any run of samples of any shard: the same keys and member bytes as the local reader, from
    one ranged GET of whole blocks."""
    store = _store(server)
    for name in ("train-000000.tar", "train-000002.tar", "val-000001.tar"):
        assert _members(_read(store, name, *span)) == _members(_local(pack, name, *span))
    (rng,) = server.faults.gets("train-000002.tar")
    first = min(o for _, m in store.index("train-000002.tar")[span[0] : span[1]] for o, _ in m.values())
    assert rng.startswith(f"bytes={first // BLOCK * BLOCK}-")  # whole blocks, from the first needed


def test_connection_dropped_mid_tar_resumes(pack: Path, server: remotekit.FileServer) -> None:
    server.faults.cut_after["train-000001.tar"] = 20_000
    store = _store(server)
    assert _members(_read(store, "train-000001.tar")) == _members(_local(pack, "train-000001.tar"))
    first, again = server.faults.gets("train-000001.tar")
    lo = int(first.removeprefix("bytes=").split("-")[0])
    assert again.startswith(f"bytes={lo + 20_000}-")  # resumed from the byte where it stopped


def test_503_twice_then_200_is_retried(pack: Path, server: remotekit.FileServer) -> None:
    server.faults.statuses["train-000000.tar"] = [503, 503]
    server.faults.statuses[MANIFEST] = [503]
    store = _store(server)
    assert _members(_read(store, "train-000000.tar")) == _members(_local(pack, "train-000000.tar"))
    assert len(server.faults.gets("train-000000.tar")) == 3


def test_retries_end_in_one_line(server: remotekit.FileServer) -> None:
    store = _store(server)
    server.faults.statuses["val-000000.tar"] = [503] * 10
    with pytest.raises(HandposeError) as e:
        _read(store, "val-000000.tar")
    assert str(e.value).startswith(f"{server.url('val-000000.tar')}: HTTP 503") and "tried 4 times" in str(
        e.value
    )
    assert "\n" not in str(e.value)


def test_404_is_one_line_and_not_retried(pack: Path, server: remotekit.FileServer) -> None:
    store = _store(server)
    (pack / "val-000001.tar").unlink()
    with pytest.raises(HandposeError) as e:
        _read(store, "val-000001.tar")
    assert str(e.value) == f"{server.url('val-000001.tar')}: not found (HTTP 404)"
    assert len(server.faults.gets("val-000001.tar")) == 1
    with pytest.raises(HandposeError, match=r"/nowhere: no manifest.json \(not a packed shards folder"):
        read_manifest(server.url("nowhere"))


def test_changed_byte_is_refused_before_its_samples(pack: Path, server: remotekit.FileServer) -> None:
    """A byte changed on the server: one line naming the URL; every sample handed on before the
    error lies wholly before the damaged block (nothing unverified reaches a caller)."""
    name = "train-000002.tar"
    store = _store(server)
    index = store.index(name)
    offset, size = index[6][1]["jpg"]
    data = bytearray((pack / name).read_bytes())
    data[offset + size // 2] ^= 0xFF
    (pack / name).write_bytes(bytes(data))
    got = []
    with pytest.raises(HandposeError) as e:
        for s in read_samples(f"{store.root}/{name}", MEMBERS, store=store):
            got.append(s["__key__"])
    assert str(e.value).startswith(f"{server.url(name)}: sha256 of bytes ")
    assert str(e.value).endswith(f"differs from the manifest (damaged or changed since packing); {REUPLOAD}")
    bad_block = (offset + size // 2) // BLOCK
    ends = {key: max(o + n for e, (o, n) in m.items() if e in MEMBERS) for key, m in index}
    assert got and all(ends[k] <= bad_block * BLOCK for k in got)
    assert [k for k, _ in index].index(got[-1]) < 6


def test_slow_server_progress_continues(pack: Path, server: remotekit.FileServer) -> None:
    """A server that sends 4 KiB every 20 ms, slower in all than the 0.25 s timeout for one wait:
    the read goes on without a retry."""
    server.faults.pause_s, server.faults.chunk = 0.02, 4096
    m = remote.open_manifest(Url(server.url()), retry=remote.Retry(attempts=1, timeout_s=0.25))
    assert m.store is not None
    assert _members(_read(m.store, "train-000000.tar")) == _members(_local(pack, "train-000000.tar"))
    assert len(server.faults.gets("train-000000.tar")) == 1


def test_loader_worker_reports_a_damaged_shard_as_one_line(pack: Path, server: remotekit.FileServer) -> None:
    """In a DataLoader worker the mismatch reaches the caller as the one line (no traceback)."""
    data = bytearray((pack / "val-000001.tar").read_bytes())
    data[3000] ^= 1
    (pack / "val-000001.tar").write_bytes(bytes(data))
    loader = make_loader(server.url(), "val", batch_size=4, workers=2)
    with pytest.raises(HandposeError) as e:
        list(loader)
    assert str(e.value).startswith(
        f"{server.url('val-000001.tar')}: sha256 of bytes 0..8192 differs from the manifest"
    ) and "\n" not in str(e.value)


def test_v2_pack_streams_only_through_a_cache(
    pack: Path, server: remotekit.FileServer, tmp_path: Path
) -> None:
    m = json.loads((pack / MANIFEST).read_text())
    m["format_version"] = 2
    for e in m["shards"]:
        del e["block_bytes"], e["block_sha256"]
    (pack / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(HandposeError, match=r"format v2 pack .* only through a cache \(--cache DIR\)"):
        make_loader(server.url(), "val", batch_size=4, workers=0)
    loader = make_loader(server.url(), "val", batch_size=4, workers=0, cache=Cache(tmp_path / "c"))
    local = make_loader(pack, "val", batch_size=4, workers=0)
    assert [k for b in loader for k in b["key"]] == [k for b in local for k in b["key"]]


def test_dali_without_a_cache_is_one_line(server: remotekit.FileServer) -> None:
    with pytest.raises(HandposeError, match=r"the DALI loader reads local files only; give --cache DIR"):
        make_loader(server.url(), "val", kind="dali", batch_size=4)


def test_dali_reads_a_url_through_the_cache(pack: Path, server: remotekit.FileServer, tmp_path: Path) -> None:
    """The DALI kind gets the cache's verified local copies: the same batches as from the folder."""
    pytest.importorskip("nvidia.dali")
    far = make_loader(server.url(), "val", kind="dali", batch_size=4, workers=1, cache=Cache(tmp_path / "c"))
    near = make_loader(pack, "val", kind="dali", batch_size=4, workers=1)
    a, b = list(far), list(near)
    assert [x["key"] for x in a] == [x["key"] for x in b] and len(a) == 4
    assert all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["uv"], y["uv"])
        for x, y in zip(a, b, strict=True)
    )
    assert len(server.faults.gets("val-000000.tar")) == len(server.faults.gets("val-000001.tar")) == 1


def test_s3_without_boto3_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "botocore.exceptions", None)
    with pytest.raises(
        HandposeError,
        match=r"^s3://b/p/manifest.json: s3:// locations need boto3: pip install 'handpose\[s3\]'$",
    ):
        read_manifest("s3://b/p")


# ------------------------------------------------------------------ the cache


def test_cache_settings_are_checked_in_one_place(tmp_path: Path) -> None:
    """make_cache checks a cache folder and bound for the CLI's flags and train's keys alike."""
    from handpose.config import load_config
    from handpose.train import TrainConfig

    for given, line in (
        ({"cache_limit": "5G"}, "--cache_limit: give cache_dir too (the folder it bounds)"),
        ({"cache_dir": str(tmp_path), "cache_limit": "lots"}, "--cache_limit: 'lots' is not a size"),
        ({"cache_dir": "https://h/c"}, "--cache_dir: https://h/c must be a folder on this machine"),
    ):
        with pytest.raises(HandposeError) as e:
            load_config(TrainConfig, None, given)
        assert str(e.value).startswith(line)
    cfg = load_config(TrainConfig, None, {"cache_dir": str(tmp_path), "cache_limit": "2GiB"})
    assert remote.make_cache(cfg.cache_dir, cfg.cache_limit) == Cache(tmp_path, 2 << 30)
    with pytest.raises(HandposeError, match=r"^--cache-limit: give --cache too"):
        remote.make_cache(None, "5G")


def test_cache_fetches_once_and_repairs_entries(
    pack: Path, server: remotekit.FileServer, tmp_path: Path
) -> None:
    cache = Cache(tmp_path / "cache")
    store = _store(server, cache)
    name = "train-000001.tar"
    want = _members(_local(pack, name))
    assert _members(_read(store, name)) == want
    assert _members(_read(store, name, 3, 7)) == want[3:7]
    assert len(server.faults.gets(name)) == 1  # streamed once, into the cache
    entry = cache.folder / f"{store.tars[name].sha256}.tar"
    assert entry.read_bytes() == (pack / name).read_bytes()
    assert entry.stat().st_mtime_ns == remote.stamp(store.tars[name].sha256)  # verified, as written
    assert all(s["__url__"] == server.url(name) for s in _read(store, name, 0, 2))
    # a wrong size: fetched again
    entry.write_bytes(entry.read_bytes()[:-100])
    assert _members(_read(store, name)) == want
    assert len(server.faults.gets(name)) == 2 and entry.read_bytes() == (pack / name).read_bytes()
    # a changed byte (same size): its block fails, the entry is fetched again
    data = bytearray(entry.read_bytes())
    data[100] ^= 1
    entry.write_bytes(bytes(data))  # a write: no longer the mtime the cache stamped it with
    assert _members(_read(store, name)) == want
    assert len(server.faults.gets(name)) == 3 and entry.read_bytes() == (pack / name).read_bytes()


def test_cache_continues_a_partial_download(pack: Path, server: remotekit.FileServer, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    store = _store(server, cache)
    name = "val-000000.tar"
    part = cache.folder / f".{store.tars[name].sha256}.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes((pack / name).read_bytes()[:5000])  # left by a killed run
    assert _members(_read(store, name)) == _members(_local(pack, name))
    assert server.faults.gets(name) == [f"bytes=5000-{(pack / name).stat().st_size - 1}"]
    assert not part.exists()


def test_cache_limit_drops_the_least_recently_used(
    pack: Path, server: remotekit.FileServer, tmp_path: Path
) -> None:
    names = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    sizes = [(pack / n).stat().st_size + (pack / n.replace(".tar", ".idx")).stat().st_size for n in names]
    cache = Cache(tmp_path / "cache", limit=sizes[1] + sizes[2] + 100)
    store = _store(server, cache)
    kept = [f"{store.tars[n].sha256}.tar" for n in names]
    for n in names:
        _read(store, n, 0, 1)
    left = sorted(p.name for p in cache.folder.iterdir() if p.suffix == ".tar")
    assert left == sorted(kept[1:])
    assert sum(p.stat().st_size for p in cache.folder.iterdir() if p.is_file()) <= cache.limit
    with pytest.raises(HandposeError, match=r"--cache-limit 1000 bytes: smaller than .*train-000000.tar"):
        _read(_store(server, Cache(tmp_path / "small", limit=1000)), names[0])


@pytest.mark.slow
def test_cache_filled_once_by_two_ranks(pack: Path, server: remotekit.FileServer, tmp_path: Path) -> None:
    """2 ranks x 2 workers share one cache: each tar and index is downloaded once; the keys are
    those of the local folder, exactly once."""
    out = tmp_path / "out"
    _torchrun(server.url(), "train", out, ranks=2, workers=2, batch=2, cache=tmp_path / "cache")
    for name in ("train-000000", "train-000001", "train-000002"):
        assert len(server.faults.gets(f"{name}.tar")) == 1, server.faults.log
        assert len(server.faults.gets(f"{name}.idx")) == 1
    tars = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".tar")
    assert len(tars) == 3


# ------------------------------------------------------------------ exactly once, over http


@pytest.mark.slow
def test_exactly_once_over_http_world_3_workers_2(
    pack: Path, server: remotekit.FileServer, tmp_path: Path
) -> None:
    for root, out in ((server.url(), tmp_path / "http"), (str(pack), tmp_path / "local")):
        _torchrun(root, "val", out, ranks=3, workers=2, batch=2)
    http = [json.loads((tmp_path / "http" / f"rank{r}.json").read_text()) for r in range(3)]
    local = [json.loads((tmp_path / "local" / f"rank{r}.json").read_text()) for r in range(3)]
    keys = [k for r in http for k in r["keys"]]
    assert sorted(keys) == [sample_key(i) for i in range(30, 43)]
    assert [r["keys"] for r in http] == [r["keys"] for r in local]
    assert all(r["batches"] == r["len"] for r in http)


def _torchrun(
    root: str, split: str, out: Path, *, ranks: int, workers: int, batch: int, cache: Path | None = None
) -> None:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd += [str(TESTS / "loader_rank_keys.py"), root, split, str(out), "wds", str(workers), str(batch)]
    cmd += [str(cache)] if cache is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------ every command, http and s3


@pytest.fixture(scope="module")
def urls(packed: Path) -> Iterator[dict[str, str]]:
    """The shared `packed` fixture served over http and by moto's S3 server."""
    with serving(packed) as http, remotekit.s3_server({"shards": packed}):
        yield {"http": http.url(), "s3": "s3://packs/shards"}


TINY = {
    **{"image_size": "32", "width": "4", "batch_size": "4", "workers": "1", "optimizer": "adamw"},
    **{"lr": "0.01", "schedule": "constant", "log_every": "1", "epochs": "1", "batches_per_epoch": "2"},
    "val_batches": "2",
}


@pytest.mark.parametrize("scheme", ["http", "s3"])
def test_train_over_a_url_equals_local(
    packed: Path, urls: dict[str, str], scheme: str, tmp_path: Path
) -> None:
    from handpose import checkpoint

    local, far = tmp_path / "local", tmp_path / "far"
    train(None, {**TINY, "shards": str(packed), "out": str(local)})
    train(None, {**TINY, "shards": urls[scheme], "out": str(far), "cache_dir": str(tmp_path / "cache")})
    a, b = checkpoint.load(local / "checkpoints/last.pt"), checkpoint.load(far / "checkpoints/last.pt")
    assert all(np.array_equal(a["model"][k].numpy(), b["model"][k].numpy()) for k in a["model"])
    keep = ("train_loss", "val_loss", "val_error_px")
    ma, mb = (json.loads((r / "metrics.jsonl").read_text()) for r in (local, far))
    assert {k: ma[k] for k in keep} == {k: mb[k] for k in keep}


@pytest.mark.parametrize("scheme", ["http", "s3"])
def test_verify_inspect_predict_over_a_url_equal_local(
    packed: Path, urls: dict[str, str], scheme: str, tmp_path: Path
) -> None:
    url = urls[scheme]
    assert verify(url) == verify(packed)
    inspect_shards(packed, split="val", n=6, png=tmp_path / "local.png")
    inspect_shards(url, split="val", n=6, png=tmp_path / "far.png")
    assert (tmp_path / "local.png").read_bytes() == (tmp_path / "far.png").read_bytes()
    runs = {}
    for where, loc in (("local", packed), ("far", url)):
        predict((IntensityModel(), WARP), [loc], tmp_path / where, split="val", boxes="gt", quiet=True)
        runs[where] = [json.loads(line) for line in (tmp_path / where / "predictions.jsonl").open()]
    assert [Path(r["path"]).name for r in runs["far"]] == [Path(r["path"]).name for r in runs["local"]]
    assert [r["path"] for r in runs["far"]][0].startswith(f"{url}/val-")
    assert [r["keypoints"] for r in runs["far"]] == [r["keypoints"] for r in runs["local"]]
    _, shards = split_shards(url, "val")
    assert [str(s).rsplit("/", 1)[1] for s in shards] == [p.name for p in split_shards(packed, "val")[1]]


def test_verify_names_a_damaged_shard_at_a_url(pack: Path, server: remotekit.FileServer) -> None:
    data = bytearray((pack / "train-000001.tar").read_bytes())
    data[-20] ^= 1  # in the end-of-archive padding: only the sha256s can tell
    (pack / "train-000001.tar").write_bytes(bytes(data))
    (pack / "val-000000.idx").unlink()
    with pytest.raises(HandposeError, match=r": 2 of 5 shards damaged \(train-000001.tar, val-000000.tar\)"):
        verify(server.url())


def test_a_damaged_shard_stops_training_before_any_checkpoint(
    pack: Path, server: remotekit.FileServer, tmp_path: Path
) -> None:
    """The mismatch is seen by a loader worker mid-epoch; training stops with its one line and
    writes no checkpoint from the steps that read that shard's other samples."""
    data = bytearray((pack / "train-000002.tar").read_bytes())
    data[(pack / "train-000002.tar").stat().st_size // 2] ^= 1
    (pack / "train-000002.tar").write_bytes(bytes(data))
    run = tmp_path / "run"
    cfg = {**TINY, "shards": server.url(), "out": str(run), "batches_per_epoch": "0", "workers": "2"}
    with pytest.raises(
        HandposeError, match=r"train-000002.tar: sha256 of bytes \d+\.\.\d+ differs from the manifest"
    ):
        train(None, cfg)
    assert not (run / "checkpoints" / "last.pt").exists()


# ------------------------------------------------------------------ detection items and negatives


def _batches(loader: object, epochs: int = 1) -> list[dict]:
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)  # type: ignore[attr-defined]
        out += list(loader)  # type: ignore[call-overload]
    return out


def _same_batches(far: list[dict], near: list[dict]) -> None:
    assert len(far) == len(near) > 0
    for a, b in zip(far, near, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


@pytest.mark.parametrize("kind", ["wds", "dali"])
def test_detection_items_read_a_url_as_the_folder(tmp_path: Path, kind: str) -> None:
    """The detector's items (photos with all their hands, mosaics, every val photo once) from a URL,
    streamed without a cache in both kinds (DALI's detection photos come from the same Python
    stream): the batches the folder gives, bit for bit."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    root, _ = hand_dots_pack(tmp_path / "dots")
    layout = LayoutConfig(mosaic=0.6, mosaic_centre=0.4, canvas=0.3, canvas_scale_min=0.5)
    workers = 1 if kind == "dali" else 2
    with serving(root) as server:
        for split, kw in (("train", {"layout": layout}), ("val", {})):
            far, near = (
                make_loader(
                    where,
                    split,
                    kind=kind,
                    task="detect",
                    image_size=96,
                    batch_size=4,
                    workers=workers,
                    seed=3,
                    **kw,
                )  # fmt: skip
                for where in (server.url(), root)
            )
            _same_batches(
                _batches(far, 2 if split == "train" else 1), _batches(near, 2 if split == "train" else 1)
            )
        assert server.faults.gets("val-000000.tar")  # read from the server, not the folder


def test_negatives_read_a_url_as_the_folder(tmp_path: Path) -> None:
    """Crops without a hand need every hand box of their photo: from a URL (blocks of 8 KiB, so
    photos straddle blocks) the same crops as from the folder."""
    rng = np.random.default_rng(5)
    samples: list = []
    for photo in range(16):
        samples += photo_samples(len(samples), rng, hands=1 + photo % 3)
    root = write_pack(tmp_path / "photos", {"train": [samples[:16], samples[16:]]}, block_bytes=BLOCK)
    with serving(root) as server:
        far, near = (
            make_loader(where, "train", batch_size=6, workers=2, crop="box", negatives=0.5, seed=1)
            for where in (server.url(), root)
        )
        a, b = _batches(far, 2), _batches(near, 2)
    _same_batches(a, b)
    assert not all(x["present"].all() for x in a)  # some crops without a hand


@pytest.mark.parametrize("kind", ["wds", "dali"])
def test_a_detection_reader_reports_a_damaged_shard_as_one_line(tmp_path: Path, kind: str) -> None:
    """A WDS worker hands the mismatch over as its last item; DALI's photo stream runs in the
    main process and raises it there: either way the caller gets the one line."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    # other seeds than above: verified blocks are remembered by their digest in this process
    root, _ = hand_dots_pack(tmp_path / "dots", seed=1 if kind == "wds" else 2)
    data = bytearray((root / "val-000001.tar").read_bytes())
    data[700] ^= 1
    (root / "val-000001.tar").write_bytes(bytes(data))
    with serving(root) as server:
        workers = 2 if kind == "wds" else 1
        loader = make_loader(
            server.url(), "val", kind=kind, task="detect", image_size=96, batch_size=4, workers=workers
        )
        with pytest.raises(HandposeError) as e:
            list(loader)
    assert str(e.value).startswith(f"{server.url('val-000001.tar')}: sha256 of bytes 0..")
    assert "\n" not in str(e.value)


def test_file_url_is_a_path(pack: Path, tmp_path: Path) -> None:
    a = make_loader(f"file://{pack}", "val", batch_size=4, workers=0)
    b = make_loader(pack, "val", batch_size=4, workers=0)
    assert [k for x in a for k in x["key"]] == [k for x in b for k in x["key"]]
    shutil.rmtree(pack)


@pytest.mark.slow
def test_bench_loader_compares_a_served_url_with_local(
    pack: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bench loader --serve`: the same shards over http://127.0.0.1, streamed, unchecked and
    cached, in the same run as the local folder (figures are reported, never asserted)."""
    from handpose.bench.loader import bench_loader

    result = bench_loader(pack, workers=1, batches=2, batch_size=4, rounds=1, serve=True)
    assert result["url"].startswith("http://127.0.0.1:")
    for key in ("url_samples_per_s", "url_unchecked_samples_per_s", "url_cache_samples_per_s"):
        assert result[key] > 0
    assert (
        json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verify_cost_pct"]
        == result["verify_cost_pct"]
    )
    assert remote.HASH_BLOCKS  # switched back on


def test_the_cli_takes_urls_and_says_one_line(
    pack: Path, server: remotekit.FileServer, tmp_path: Path
) -> None:
    """The real console script: verify and inspect take a URL (not folded by a Path); a URL's
    mistakes are one line, exit 1."""
    handpose = [str(Path(sys.executable).parent / "handpose")]
    env = {**os.environ, "COLUMNS": "1000"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*handpose, *args], capture_output=True, text=True, env=env, timeout=300)

    ok = run("verify", server.url())
    assert ok.returncode == 0 and "all 5 shards intact" in ok.stdout
    png = tmp_path / "sheet.png"
    assert run("inspect", server.url(), "--split", "val", "--n", "4", "--png", str(png)).returncode == 0
    assert png.stat().st_size > 0
    for args, line in (
        (("verify", server.url("nowhere")), f"{server.url('nowhere')}: no manifest.json"),
        (("inspect", server.url()), f"{server.url()}: a URL; give --png FILE"),
        (("inspect", "ftp://h/x", "--png", str(png)), "ftp://h/x: unsupported location ftp://"),
        (
            ("inspect", server.url(), "--cache-limit", "5G", "--png", str(png)),
            "--cache-limit: give --cache too (the folder it bounds)",
        ),
    ):
        p = run(*args)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {line}"), p.stderr
