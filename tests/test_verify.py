"""Shards are checked before they are trusted: the manifest's schema, every shard's size when a
set is opened, sha256s before reading (unless --no-verify), and `handpose verify`.

Damage is done to private copies of the session's `packed` folder (or to small hand-made packs
from shardkit); the real CLI runs as a subprocess, as a user would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shardkit import chunk, dot_sample, overwrite_member, write_pack

from handpose.datasets import open_sets, share_by_size, verify_sets
from handpose.errors import HandposeError
from handpose.inspector import inspect_shards
from handpose.loader import make_loader
from handpose.predict import predict
from handpose.shards import (
    MANIFEST,
    file_problem,
    index_name,
    manifest_problems,
    read_index,
    read_manifest,
    sha256_file,
    split_shards,
    verify_shards,
)
from handpose.verify import shard_problems, verify

BIN = Path(sys.executable).parent
REPACK = "re-run handpose pack"
NEW_X = np.float32(12345.0).tobytes()  # 4 bytes written over a keypoint's x


def _cli(*args: Any) -> subprocess.CompletedProcess[str]:
    # A wide terminal: rich wraps at the terminal's width, and an error must be one line.
    env = {**os.environ, "COLUMNS": "1000"}
    cmd = [str(BIN / "handpose"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _predict(pack: Path, out: Path, *, verify: bool) -> dict[str, Any]:
    """The real predict() on the train split, with a stub model (predictkit)."""
    from predictkit import WARP, IntensityModel

    return predict((IntensityModel(), WARP), [pack], out, split="train", verify=verify, quiet=True)


def _error_line(p: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed; asserts exit 1, one line, no traceback."""
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.fixture
def pack(packed: Path, tmp_path: Path) -> Path:
    """A private copy of the session's packed folder, to damage."""
    root = tmp_path / "shards"
    shutil.copytree(packed, root)
    return root


def _edit_manifest(root: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads((root / MANIFEST).read_text())
    edit(data)
    (root / MANIFEST).write_text(json.dumps(data))


def _first(root: Path, split: str = "train") -> str:
    return read_manifest(root).entries(split)[0]["name"]


# ----------------------------------------------------------------------------- the manifest's schema

MANIFEST_EDITS = {
    "samples": (
        lambda m: m["shards"][3].update(samples="many"),
        'shards[3].samples: expected an integer >= 0, got "many"',
    ),
    "stats": (lambda m: m.pop("stats"), "stats: missing"),
    "counts": (
        lambda m: m["counts"].update(train=999),
        "counts.train: 999, but the train shards hold 48 samples",
    ),
    "traversal": (
        lambda m: m["shards"][0].update(name="../" + m["shards"][0]["name"]),
        'shards[0].name: expected a plain file name ending in .tar (no folder), got "../train-000000.tar"',
    ),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_a_hand_edited_manifest_is_one_line(case: str, pack: Path) -> None:
    edit, expected = MANIFEST_EDITS[case]
    _edit_manifest(pack, edit)
    with pytest.raises(HandposeError) as e:
        read_manifest(pack)
    assert str(e.value) == f"{pack / MANIFEST}: {expected}"
    for command in (["verify", pack], ["inspect", pack, "--png", pack.parent / "x.png"]):
        assert _error_line(_cli(*command)).endswith(expected)


def test_every_problem_gets_its_line(packed: Path) -> None:
    valid = json.loads((packed / MANIFEST).read_text())
    data = json.loads(json.dumps(valid))
    data["shards"][0]["sha256"] = "abc"
    data["shards"][1].pop("bytes")
    data["stats"]["mean"] = [0.5, float("nan"), 0.5]
    data["mean_pose"]["labelled"] = [1] * 20
    data["skipped"] = [{"file": "a.jpg"}]
    assert manifest_problems(data) == [
        'shards[0].sha256: expected a sha256 (64 lowercase hex digits), got "abc"',
        "shards[1].bytes: missing",
        "stats.mean[1]: expected a finite number in [0, 1], got NaN",
        "mean_pose.labelled: expected a list of 21 counts, got [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ...",
        "skipped[0].reason: missing",
    ]
    # once the types are right: whether the parts agree
    data = json.loads(json.dumps(valid))
    data["shards"][1]["name"] = data["shards"][0]["name"]
    data["counts"]["bogus"] = 0
    assert manifest_problems(data) == [
        "shards: 'train-000000.tar' is listed 2 times",
        "shards[1].index: expected 'train-000000.idx' (the index beside 'train-000000.tar'), "
        'got "train-000001.idx"',
        "counts.bogus: not a split (expected one of train, val, test, eval)",
    ]


def test_what_pack_writes_is_valid_and_records_the_indexes(packed: Path) -> None:
    data = json.loads((packed / MANIFEST).read_text())
    assert manifest_problems(data) == []
    for e in data["shards"]:
        idx = packed / index_name(e["name"])
        assert (e["index_bytes"], e["index_sha256"]) == (idx.stat().st_size, sha256_file(idx))


def test_v3_records_a_sha256_per_block_of_each_tar(packed: Path, tmp_path: Path) -> None:
    """pack's block digests are those of each MiB of the tar read back; a wrong count or a missing
    one is one line; a v2 manifest (no blocks) still reads from a folder."""
    import hashlib

    from handpose.shards import BLOCK_BYTES

    data = json.loads((packed / MANIFEST).read_text())
    assert data["format_version"] == 3
    for e in data["shards"]:
        raw = (packed / e["name"]).read_bytes()
        blocks = [raw[i : i + BLOCK_BYTES] for i in range(0, len(raw), BLOCK_BYTES)]
        assert e["block_bytes"] == BLOCK_BYTES
        assert e["block_sha256"] == [hashlib.sha256(b).hexdigest() for b in blocks]
    bad = json.loads(json.dumps(data))
    bad["shards"][2]["block_sha256"].append(bad["shards"][2]["sha256"])
    del bad["shards"][4]["block_bytes"]
    assert manifest_problems(bad) == [
        f"shards[2].block_sha256: 2 digests, but {bad['shards'][2]['bytes']} bytes in blocks of "
        f"{BLOCK_BYTES} make 1",
        "shards[4].block_bytes: missing (format v3 records it for every shard)",
    ]
    root = tmp_path / "v2"
    shutil.copytree(packed, root)
    for e in data["shards"]:
        del e["block_bytes"], e["block_sha256"]
    data["format_version"] = 2
    (root / MANIFEST).write_text(json.dumps(data))
    assert verify(root)["shards"] == len(data["shards"])
    assert len(list(make_loader(root, "val", batch_size=4, workers=0))) > 0


def test_verify_checks_the_block_digests(pack: Path, tmp_path: Path) -> None:
    first = _first(pack)
    _edit_manifest(pack, lambda m: m["shards"][0]["block_sha256"].__setitem__(0, "0" * 64))
    with pytest.raises(HandposeError, match=rf"1 of \d+ shards damaged \({first}\)"):
        verify(pack)
    # the one check of a packed file (file_problem) names the block's bytes in its one wording
    rng = np.random.default_rng(3)
    root = write_pack(
        tmp_path / "small", {"train": [[dot_sample(i, rng) for i in range(6)]]}, block_bytes=4096
    )
    e = read_manifest(root).entries("train")[0]
    assert len(e["block_sha256"]) > 2
    tar, digests = root / e["name"], list(e["block_sha256"])
    assert file_problem(tar, e["bytes"], e["sha256"], blocks=(4096, digests)) is None
    digests[1] = "0" * 64
    problem = "sha256 of bytes 4096..8192 differs from the manifest (damaged or changed since packing)"
    assert file_problem(tar, e["bytes"], e["sha256"], blocks=(4096, digests)) == problem
    assert shard_problems(root, {**e, "block_sha256": digests}, lambda n: None) == [f"{e['name']}: {problem}"]


# ----------------------------------------------------------------------------- sizes, on opening


def _delete_tar(root: Path) -> Path:
    path = root / _first(root)
    path.unlink()
    return path


def _truncate_tar(root: Path) -> Path:
    path = root / _first(root)
    path.write_bytes(path.read_bytes()[:3000])
    return path


def _truncate_idx(root: Path) -> Path:
    path = root / index_name(_first(root))
    path.write_bytes(path.read_bytes()[:-10])
    return path


@pytest.mark.parametrize("damage", [_delete_tar, _truncate_tar, _truncate_idx])
def test_every_consumer_checks_sizes_when_it_opens_a_set(
    damage: Callable[[Path], Path], pack: Path, tmp_path: Path
) -> None:
    path = damage(pack)
    consumers: dict[str, Callable[[], Any]] = {
        "split_shards": lambda: split_shards(pack, "train"),
        "wds loader": lambda: make_loader(pack, "train", kind="wds", batch_size=4, workers=0),
        "dali loader": lambda: make_loader(pack, "train", kind="dali", batch_size=4, workers=0),
        "inspect": lambda: inspect_shards(pack, png=tmp_path / "x.png", verify=False),
        "predict": lambda: _predict(pack, tmp_path / "out", verify=False),
    }
    for name, consumer in consumers.items():
        with pytest.raises(HandposeError) as e:
            consumer()
        message = str(e.value)
        assert message.startswith(f"{path}: ") and message.endswith(REPACK), name
        assert "\n" not in message, name
    # the opt-out skips the hash, never the size check
    assert _error_line(_cli("inspect", pack, "--no-verify", "--png", tmp_path / "x.png")).endswith(REPACK)


def test_a_missing_index_is_read_by_streaming_but_reported_by_verify(pack: Path) -> None:
    idx = pack / index_name(_first(pack))
    idx.unlink()
    _, shards = split_shards(pack, "train")  # the reader streams the tar instead
    with pytest.raises(HandposeError, match=f"{_first(pack)}"):
        verify(pack)


# ----------------------------------------------------------------------------- sha256, before reading


def test_changed_keypoint_bytes_are_caught_before_reading(pack: Path, tmp_path: Path) -> None:
    """Four bytes of a kp.f32 member changed in place: the size is right, the label is wrong.
    Every consumer that reads the shard refuses it unless the user opts out."""
    shard = _first(pack)
    overwrite_member(pack, shard, 0, "kp.f32", 0, NEW_X)
    expected = (
        f"{pack / shard}: sha256 differs from the manifest (damaged or changed since packing); {REPACK}"
    )
    manifest, _ = split_shards(pack, "train")  # sizes agree: opening is fine
    with pytest.raises(HandposeError) as e:
        verify_shards(manifest, manifest.entries("train"))
    assert str(e.value) == expected
    sets = open_sets([pack], "train", crops=["image"], pad=1.25)
    with pytest.raises(HandposeError) as e:
        verify_sets(sets)
    assert str(e.value) == expected
    with pytest.raises(HandposeError) as e:
        inspect_shards(pack, n=1, png=tmp_path / "x.png")
    assert str(e.value) == expected
    with pytest.raises(HandposeError) as e:
        _predict(pack, tmp_path / "out", verify=True)
    assert str(e.value) == expected

    # opted out: the damaged label is what gets read (the reason the hash is on by default)
    _predict(pack, tmp_path / "out", verify=False)
    key = read_index(pack / index_name(shard))[0][0]
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    [line] = [r for r in lines if r["path"] == f"{pack / shard}/{key}.jpg"]
    assert line["error_px"] > 12345.0 / 21 - 300  # joint 0 labelled at x = 12345
    inspect_shards(pack, n=1, png=tmp_path / "x.png", verify=False)

    # the real CLI: one line, exit 1; --no-verify draws
    n = len(manifest.entries())
    assert _error_line(_cli("verify", pack)).endswith(f"1 of {n} shards damaged ({shard}); {REPACK}")
    assert _error_line(_cli("inspect", pack, "--n", "1", "--png", tmp_path / "y.png")) == f"error: {expected}"
    ok = _cli("inspect", pack, "--n", "1", "--no-verify", "--png", tmp_path / "y.png")
    assert ok.returncode == 0 and (tmp_path / "y.png").is_file()


def test_bench_loader_verifies_first(pack: Path) -> None:
    from handpose.bench.loader import bench_loader

    shard = _first(pack)
    overwrite_member(pack, shard, 1, "kp.f32", 8, NEW_X)
    with pytest.raises(HandposeError, match=f"{shard}: sha256 differs"):
        bench_loader(pack, workers=0, batches=1, batch_size=2, rounds=1)


def test_share_by_size_partitions_and_balances() -> None:
    sizes = [50, 10, 40, 30, 30, 20, 10, 10]
    for world_size in (1, 2, 3, 8, 10):
        owner = share_by_size(sizes, world_size)
        assert owner == share_by_size(sizes, world_size)  # every rank computes the same
        assert len(owner) == len(sizes) and set(owner) <= set(range(world_size))
        load = [sum(s for s, r in zip(sizes, owner, strict=True) if r == k) for k in range(world_size)]
        assert max(load) - min(load) <= max(sizes)
    assert share_by_size([4, 3, 3, 2], 2) == [0, 1, 1, 0]  # 6 bytes each


def _gloo_rank(rank: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    from handpose.distributed import World, all_gather_objects

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world = World(rank=rank, world_size=2)
    sets = open_sets([root], "train", crops=["image"], pad=1.25) + open_sets(
        [root], "val", crops=["image"], pad=1.25
    )
    try:
        verify_sets(sets, rank=rank, world_size=2, gather=lambda p: all_gather_objects(p, world))
        message = "no error"
    except HandposeError as e:
        message = str(e)
    Path(out, f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


@pytest.mark.slow
def test_train_verification_is_spread_over_ranks_and_stops_all(pack: Path, tmp_path: Path) -> None:
    """Two gloo ranks each hash their share; the one damaged shard (hashed by one rank only)
    stops both with the same lines, naming the damaged val shard and train shard."""
    import torch.multiprocessing as mp

    train, val = _first(pack), _first(pack, "val")
    overwrite_member(pack, train, 0, "kp.f32", 0, NEW_X)
    overwrite_member(pack, val, 0, "vis.u8", 0, b"\x07")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(port, str(pack), str(tmp_path)), nprocs=2)
    messages = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(messages) == 1
    [message] = messages
    assert message.splitlines() == sorted(
        f"{pack / name}: sha256 differs from the manifest (damaged or changed since packing); {REPACK}"
        for name in (train, val)
    )


# ----------------------------------------------------------------------------- handpose verify


def test_verify_an_intact_pack(packed: Path) -> None:
    m = read_manifest(packed)
    assert verify(packed)["samples"] == sum(m.data["counts"].values())
    p = _cli("verify", packed)
    assert p.returncode == 0, p.stderr
    assert f"all {len(m.entries())} shards intact" in p.stdout


def _bad_writer_pack(root: Path) -> Path:
    """A pack whose writer got members wrong, with a manifest that agrees with its (wrong) bytes
    and records no index digests: only the member checks can see the problems."""
    rng = np.random.default_rng(0)
    samples = [dot_sample(i, rng, 64, 64) for i in range(6)]
    sid, jpg, uv, _ = samples[1]
    samples[1] = (sid, jpg, uv, {"kp.f32": b"\0" * 160})  # 40 floats, not 42
    sid, jpg, uv, _ = samples[4]
    samples[4] = (sid, jpg, uv, {"box.f32": np.array([9, 9, 1, 1], "<f4").tobytes()})  # x1 < x0
    return write_pack(root, {"train": chunk(samples[:3], [3]), "val": chunk(samples[3:], [3])})


def test_verify_checks_members_the_sha256_cannot(tmp_path: Path) -> None:
    root = _bad_writer_pack(tmp_path / "bad")
    split_shards(root, "train")  # sizes and the recorded sha256s agree
    verify_shards(read_manifest(root), read_manifest(root).entries())
    with pytest.raises(HandposeError, match=f"2 of 2 shards damaged .*; {REPACK}"):
        verify(root)
    p = _cli("verify", root)
    assert p.returncode == 1
    table = " ".join(p.stdout.split())
    assert "0000000001.kp.f32: 160 bytes, the format's is 168" in table
    assert "sample 0000000004: does not decode (box member [9.0, 9.0, 1.0, 1.0] is not a box" in table


def test_verify_checks_every_index_line_against_its_tar(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = write_pack(tmp_path / "p", {"train": [[dot_sample(i, rng, 64, 64) for i in range(3)]]})
    idx = root / "train-000000.idx"
    lines = [line.split() for line in idx.read_text().splitlines()]  # fields: ext offset size name ...
    lines[2][5] = str(int(lines[2][5]) + 512)  # sample 1's json member: one block further on
    lines[3][2] = "99999999"  # sample 2's jpg member: far too big
    idx.write_text("".join(" ".join(fields) + "\n" for fields in lines))
    p = _cli("verify", root)
    table = " ".join(p.stdout.split())
    assert p.returncode == 1
    assert "0000000001.json: no tar header before offset" in table
    assert "0000000002.jpg: bytes" in table and "lie past the end of the tar" in table
