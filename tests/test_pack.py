"""`handpose pack` (FreiHAND and COCO input): round trip, DALI index, manifest v2, splits,
determinism, resume after a crash, bad input. YOLO input: test_pack_yolo.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from handpose import cli
from handpose.errors import HandposeError
from handpose.geometry import keypoints_box, project_points
from handpose.imageio import decode_jpeg
from handpose.pack import assign_splits, pack, parse_split, pixel_sums
from handpose.shards import (
    EVAL_SID_OFFSET,
    MEMBERS,
    decode_box,
    decode_keypoints,
    decode_visibility,
    read_manifest,
    sample_key,
)

# The options of the `packed` fixture in conftest.py: re-packing with them must give its bytes.
PACKED = {"versions": "all", "split": "0.6,0.2,0.2", "shard_size_mb": 0.06}


def read_pack(root: Path) -> dict[str, dict]:
    """Every sample of a pack by key, read back with plain tarfile + json (members in order)."""
    samples: dict[str, dict] = {}
    for shard in read_manifest(root).data["shards"]:
        with tarfile.open(root / shard["name"]) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                sample = samples.setdefault(key, {"shard": shard["name"], "members": []})
                sample["members"].append(ext)
                sample[ext] = tar.extractfile(info).read()
    return samples


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def labels(root: Path, split: str = "training") -> tuple[np.ndarray, np.ndarray]:
    xyz = np.array(json.loads((root / f"{split}_xyz.json").read_text()))
    return xyz, np.array(json.loads((root / f"{split}_K.json").read_text()))


# ---- round trip ---------------------------------------------------------------------------------


def test_round_trip_labels_images_and_keys(packed: Path, synth_root: Path) -> None:
    samples = read_pack(packed)
    xyz, K = {}, {}
    xyz["training"], K["training"] = labels(synth_root)
    xyz["evaluation"], K["evaluation"] = labels(synth_root, "evaluation")
    assert len(samples) == 40 * 2 + 8 * 2
    for key, s in samples.items():
        assert s["members"] == list(MEMBERS) and "." not in key
        meta = json.loads(s["json"])
        sid = int(np.frombuffer(s["sid.i64"], "<i8")[0])
        assert key == sample_key(sid) == meta["key"] and meta["sid"] == sid
        part = "evaluation" if sid >= EVAL_SID_OFFSET else "training"
        assert meta["source"] == f"{part}/rgb/{sid % EVAL_SID_OFFSET:08d}.jpg"
        assert s["jpg"] == (synth_root / meta["source"]).read_bytes()  # unchanged bytes
        expected = project_points(xyz[part][meta["id"]], K[part][meta["id"]])
        np.testing.assert_allclose(np.array(meta["uv"]), expected, atol=1e-4)
        np.testing.assert_array_equal(decode_keypoints(s["kp.f32"]), np.float32(meta["uv"]))
        np.testing.assert_array_equal(meta["xyz"], xyz[part][meta["id"]])
        np.testing.assert_array_equal(meta["K"], K[part][meta["id"]])
        assert (meta["width"], meta["height"]) == (224, 224) and meta["split"] in s["shard"]
        # v2: every joint labelled, the box is the keypoints' extent, one hand per image
        assert decode_visibility(s["vis.u8"]).tolist() == [1] * 21 == meta["visibility"]
        box = keypoints_box(np.array(meta["uv"]))
        np.testing.assert_array_equal(decode_box(s["box.f32"]), box.astype(np.float32))
        np.testing.assert_array_equal(meta["box"], box)
        assert meta["hand"] == 0 and "label" not in meta and "image_id" not in meta


def test_manifest_fields_and_stats(packed: Path, synth_root: Path) -> None:
    m = read_manifest(packed).data
    assert m["format_version"] == 3 and m["tool_version"] and m["skipped"] == []
    assert m["source"]["format"] == "freihand" and m["options"]["versions"] == "all"
    for shard in m["shards"]:
        tar = packed / shard["name"]
        assert shard["index"] == tar.with_suffix(".idx").name
        assert shard["bytes"] == tar.stat().st_size
        assert shard["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
    # mean/std equal a direct computation over the train split's pixels (exact integer sums)
    pixels = np.concatenate(
        [
            decode_jpeg(s["jpg"]).reshape(-1, 3).astype(np.int64)
            for s in read_pack(packed).values()
            if json.loads(s["json"])["split"] == "train"
        ]
    )
    n, sums, squares = len(pixels), pixels.sum(0), (pixels * pixels).sum(0)
    assert m["stats"]["mean"] == [int(v) / (n * 255) for v in sums]
    np.testing.assert_allclose(m["stats"]["std"], (pixels / 255).std(0), rtol=1e-9)
    assert m["stats"]["pixels"] == n and m["stats"]["split"] == "train"
    assert all(int(q) * n > int(s) ** 2 for s, q in zip(sums, squares, strict=True))
    uv = np.array([json.loads(s["json"])["uv"] for s in read_pack(packed).values()]).reshape(-1, 2)
    np.testing.assert_allclose(m["keypoint_bounds"]["min_px"], uv.min(0))
    np.testing.assert_allclose(m["keypoint_bounds"]["max_px"], uv.max(0))
    assert m["keypoint_bounds"]["labelled_fraction"] == 1.0
    assert m["images"] == {"with_hands": 96, "background": 0}
    assert m["boxes"]["hands_per_image"] == {"mean": 1.0, "max": 1}


def expected_manifest_v2(root: Path) -> dict:
    """mean_pose, boxes and keypoint bounds computed directly from the samples read back (the
    stored float32 members), over labelled joints; the mean pose over the train split."""
    hands = []
    for s in read_pack(root).values():
        meta = json.loads(s["json"])
        uv = decode_keypoints(s["kp.f32"]).astype(np.float64)
        box = decode_box(s["box.f32"]).astype(np.float64)
        hands.append((meta, uv, decode_visibility(s["vis.u8"]) > 0, box))
    stats = [h for h in hands if h[0]["split"] == "train"] or hands
    image_sum, box_sum, count = np.zeros((21, 2)), np.zeros((21, 2)), np.zeros(21)
    for meta, uv, lab, box in stats:
        w, h = meta["width"], meta["height"]
        image_sum[lab] += (uv[lab] - (w / 2, h / 2)) / max(w, h) + 0.5
        side = max(box[2] - box[0], box[3] - box[1])
        box_sum[lab] += (uv[lab] - (box[:2] + box[2:]) / 2) / side
        count[lab] += 1
    sides = np.array([max(b[2] - b[0], b[3] - b[1]) for _, _, _, b in hands])
    longs = np.array([max(m["width"], m["height"]) for m, _, _, _ in hands])
    extents = [keypoints_box(uv, lab) for _, uv, lab, _ in hands]
    ratios = sides / np.array([max(e[2] - e[0], e[3] - e[1]) for e in extents])
    outside = sum(b[0] < 0 or b[1] < 0 or b[2] > m["width"] or b[3] > m["height"] for m, _, _, b in hands)
    labelled = np.concatenate([uv[lab] for _, uv, lab, _ in hands])
    n = np.maximum(count, 1)[:, None]
    return {
        "image": np.where(count[:, None] > 0, image_sum / n, 0.5),
        "box": np.where(count[:, None] > 0, box_sum / n, 0.0),
        "labelled": count,
        "side_px": np.percentile(sides, [0, 10, 50, 90, 100]),
        "side_frac": np.percentile(sides / longs, [0, 10, 50, 90, 100]),
        "box_to_keypoints": np.median(ratios),
        "outside_image": outside,
        "min_px": labelled.min(0),
        "max_px": labelled.max(0),
        "labelled_fraction": sum(lab.sum() for _, _, lab, _ in hands) / (21 * len(hands)),
    }


def assert_manifest_v2(root: Path) -> None:
    m, want = read_manifest(root).data, expected_manifest_v2(root)
    np.testing.assert_allclose(m["mean_pose"]["image"], want["image"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["mean_pose"]["box"], want["box"], rtol=0, atol=1e-12)
    assert m["mean_pose"]["labelled"] == want["labelled"].tolist()
    keys = ("min", "p10", "median", "p90", "max")
    np.testing.assert_allclose([m["boxes"]["side_px"][k] for k in keys], want["side_px"], atol=1e-6)
    np.testing.assert_allclose([m["boxes"]["side_frac"][k] for k in keys], want["side_frac"], atol=1e-6)
    assert abs(m["boxes"]["box_to_keypoints"] - want["box_to_keypoints"]) < 1e-6
    assert m["boxes"]["outside_image"] == want["outside_image"]
    np.testing.assert_array_equal(m["keypoint_bounds"]["min_px"], want["min_px"])
    np.testing.assert_array_equal(m["keypoint_bounds"]["max_px"], want["max_px"])
    assert abs(m["keypoint_bounds"]["labelled_fraction"] - want["labelled_fraction"]) < 1e-6


def test_manifest_v2_figures_equal_a_read_back(packed: Path) -> None:
    assert_manifest_v2(packed)
    mp = read_manifest(packed).mean_pose("image", 100)  # the consumer's view: model-input pixels
    assert mp.shape == (21, 2) and 0 < mp.min() and mp.max() < 100


def test_pixel_sums_are_exact() -> None:
    rng = np.random.default_rng(0)
    for shape in [(224, 224, 3), (1, 1, 3), (7, 13, 3), (600, 800, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        x = img.reshape(-1, 3).astype(np.int64)
        assert pixel_sums(img) == (x.sum(0).tolist(), (x * x).sum(0).tolist())
    full = np.full((1000, 1000, 3), 255, np.uint8)
    assert pixel_sums(full) == ([255 * 10**6] * 3, [255**2 * 10**6] * 3)


def test_idx_files_equal_wds2idx(packed: Path, tmp_path: Path) -> None:
    tool = Path(sys.executable).with_name("wds2idx")
    if not tool.exists():
        tool = Path(shutil.which("wds2idx") or "")
    if not tool.is_file():
        pytest.skip("wds2idx (nvidia-dali) is not installed")
    for shard in read_manifest(packed).data["shards"][:4]:
        out = tmp_path / shard["index"]
        subprocess.run([str(tool), str(packed / shard["name"]), str(out)], check=True, capture_output=True)
        assert (packed / shard["index"]).read_bytes() == out.read_bytes()


def test_shard_writer_bytes_equal_tarfile(tmp_path: Path) -> None:
    """ShardWriter builds ustar headers itself (fast); the bytes must stay tarfile's."""
    import io

    from handpose.shards import ShardWriter

    rng = np.random.default_rng(0)
    samples = [
        (f"{i:010d}", {ext: rng.bytes(int(rng.integers(0, 3000))) for ext in MEMBERS}) for i in range(7)
    ]
    samples.append(
        ("0000000007", {"jpg": b"x" * 512, "json": b"", "kp.f32": b"k" * 168, "sid.i64": b"s" * 8})
    )
    writer = ShardWriter(tmp_path / "ours.tar", tmp_path / "ours.idx")
    with (
        open(tmp_path / "ref.tar", "wb") as f,
        tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for key, members in samples:
            writer.write(key, members)
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    writer.close()
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()


# ---- splits -------------------------------------------------------------------------------------


def _split_ids(root: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for s in read_pack(root).values():
        meta = json.loads(s["json"])
        out.setdefault(meta["split"], set()).add(meta["id"])
    return out


def test_splits_disjoint_versions_together_counts_match(packed: Path) -> None:
    m = read_manifest(packed)
    samples = [json.loads(s["json"]) for s in read_pack(packed).values()]
    by_split: dict[str, list[dict]] = {}
    for meta in samples:
        by_split.setdefault(meta["split"], []).append(meta)
    assert {k: len(v) for k, v in by_split.items()} == m.data["counts"]
    assert m.data["counts"] == {"train": 48, "val": 16, "test": 16, "eval": 16}
    for split in by_split:
        assert sum(m.shard_samples(split)) == m.count(split)
    train_ids = [{s["id"] for s in by_split[k]} for k in ("train", "val", "test")]
    assert not (train_ids[0] & train_ids[1] or train_ids[0] & train_ids[2] or train_ids[1] & train_ids[2])
    assert train_ids[0] == set(range(24))  # id order: the first 60% of ids
    for split, metas in by_split.items():
        versions: dict[int, set[int]] = {}
        for s in metas:
            versions.setdefault(s["id"], set()).add(s["version"])
        assert all(v == {0, 1} for v in versions.values()), split  # both versions of every id
    assert all(s["sid"] >= EVAL_SID_OFFSET for s in by_split["eval"])


def test_seeded_split_shuffles_ids() -> None:
    ids = list(range(100))
    plain = assign_splits(ids, (0.8, 0.1, 0.1), None)
    seeded = assign_splits(ids, (0.8, 0.1, 0.1), 3)
    assert seeded == assign_splits(ids, (0.8, 0.1, 0.1), 3) and seeded != plain
    for a in (plain, seeded):
        assert [list(a.values()).count(s) for s in ("train", "val", "test")] == [80, 10, 10]
    assert [k for k, v in plain.items() if v == "test"] == list(range(90, 100))
    assert assign_splits(list(range(8)), (0.8, 0.15, 0.05), None) == {
        **{i: "train" for i in range(6)},
        6: "val",
        7: "test",
    }


def test_parse_split_errors() -> None:
    assert parse_split("1,0,0") == (1.0, 0.0, 0.0)
    for bad in ("0.8,0.2", "0.5,0.5,0.5", "a,b,c", "-0.1,0.6,0.5", "nan,0,1"):
        with pytest.raises(HandposeError, match="--split"):
            parse_split(bad)


def test_seeded_split_pack_keeps_versions_together(synth_root: Path, tmp_path: Path) -> None:
    pack(synth_root, tmp_path / "out", versions="all", split="0.5,0.25,0.25", split_seed=7, workers=1)
    ids = _split_ids(tmp_path / "out")
    assert ids["train"] != set(range(20))  # shuffled, not id order
    assert sum(len(v) for k, v in ids.items() if k != "eval") == 40
    by_id: dict[int, set[str]] = {}
    for meta in (json.loads(s["json"]) for s in read_pack(tmp_path / "out").values()):
        if meta["split"] != "eval":
            by_id.setdefault(meta["id"], set()).add(meta["split"])
    assert all(len(v) == 1 for v in by_id.values())


# ---- determinism and resume -----------------------------------------------------------------------


@pytest.mark.slow
def test_same_bytes_for_any_worker_count(packed: Path, synth_root: Path, tmp_path: Path) -> None:
    manifest = pack(synth_root, tmp_path / "w2", **PACKED, workers=2)
    assert digests(tmp_path / "w2") == digests(packed)  # every shard, index and the manifest
    assert manifest == json.loads((packed / "manifest.json").read_text())
    assert not (tmp_path / "w2" / ".pack").exists()


def test_interrupt_then_rerun_is_byte_identical(
    packed: Path, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import handpose.pack as packmod

    real, calls = packmod.write_shard, []

    def interrupted(*args):
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C while the sixth shard is due
        calls.append(args[0].name)
        return real(*args)

    out = tmp_path / "out"
    monkeypatch.setattr(packmod, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(synth_root, out, **PACKED, workers=1)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / ".pack").glob("*.tar.json")) == sorted(f"{n}.json" for n in calls)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    monkeypatch.setattr(packmod, "write_shard", lambda *a: calls.append(a[0].name) or real(*a))
    pack(synth_root, out, **PACKED, workers=1)
    assert len(calls) == len(read_manifest(packed).data["shards"])  # the 5 done shards were reused
    assert digests(out) == digests(packed) and not (out / ".pack").exists()


def test_resume_rewrites_a_damaged_shard(packed: Path, synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    (out / "manifest.json").unlink()
    (out / ".pack").mkdir()  # as if it crashed before writing the manifest, with no done-records
    with open(out / "train-000001.tar", "r+b") as f:
        f.write(b"garbage")
    pack(synth_root, out, **PACKED, workers=1)
    assert digests(out) == digests(packed)


@pytest.mark.slow
def test_sigkill_mid_pack_then_rerun_is_byte_identical(
    packed: Path, synth_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # A real `pack` process, slowed per sample so that the kill lands in the middle of a shard.
    code = (
        "import time, handpose.pack as p\n"
        "real = p._sample_members\n"
        "p._sample_members = lambda *a: (time.sleep(0.02), real(*a))[1]\n"
        f"p.pack({str(synth_root)!r}, {str(out)!r}, **{PACKED!r}, workers=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list((out / ".pack").glob("*.tar.json"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.03)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
    pack(synth_root, out, **PACKED, workers=1)
    assert digests(out) == digests(packed)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---- the output folder -------------------------------------------------------------------------------


def test_refuses_foreign_or_finished_output(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(HandposeError, match="not empty and not a handpose pack"):
        pack(synth_root, out, workers=1)
    (out / "notes.txt").unlink()
    pack(synth_root, out, split="1,0,0", shard_size_mb=0.1, workers=1)
    with pytest.raises(HandposeError, match="--overwrite"):
        pack(synth_root, out, workers=1)
    (out / "notes.txt").write_text("mine")
    manifest = pack(synth_root, out, workers=1, overwrite=True)  # replaces only our own files
    assert (out / "notes.txt").read_text() == "mine"
    names = {p.name for p in out.iterdir()} - {"notes.txt", "manifest.json"}
    assert names == {s["name"] for s in manifest["shards"]} | {s["index"] for s in manifest["shards"]}


# ---- bad input ----------------------------------------------------------------------------------------


def _corrupt(root: Path) -> None:
    (root / "training/rgb/00000004.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")


def _truncate(root: Path) -> None:
    path = root / "training/rgb/00000004.jpg"
    path.write_bytes(path.read_bytes()[:-200])


def _edit(name: str, edit):
    def apply(root: Path) -> None:
        path = root / name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return apply


def _set(i: int, j: int, c: int, value: float):
    def edit(xyz: list) -> None:
        xyz[i][j][c] = value

    return edit


BAD_INPUTS = {
    "missing image": (lambda r: (r / "training/rgb/00000004.jpg").unlink(), 4, "training/rgb/00000004.jpg"),
    "corrupt jpeg": (_corrupt, 4, "training/rgb/00000004.jpg"),
    "truncated jpeg": (_truncate, 4, "training/rgb/00000004.jpg"),
    "nan joint": (_edit("training_xyz.json", _set(4, 2, 0, float("nan"))), 4, "training/rgb/00000004.jpg"),
    "wrong shape": (_edit("training_xyz.json", lambda x: x[4].pop()), 4, "training/rgb/00000004.jpg"),
    "z <= 0": (_edit("training_xyz.json", _set(4, 7, 2, -0.05)), 4, "training/rgb/00000004.jpg"),
    "lengths disagree": (_edit("training_K.json", lambda K: K.pop()), 39, "training/rgb/00000039.jpg"),
}
REASONS = {
    "missing image": "missing image",
    "corrupt jpeg": "corrupt JPEG",
    "truncated jpeg": "corrupt JPEG",
    "nan joint": "non-finite",
    "wrong shape": "shape",
    "z <= 0": "z = -0.05",
    "lengths disagree": "training_K.json has no entry 39",
}


@pytest.fixture
def bad_root(synth_root: Path, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, int, str]:
    root = tmp_path / "src"
    shutil.copytree(synth_root, root)
    damage, sid, file = BAD_INPUTS[request.param]
    damage(root)
    return root, sid, file


@pytest.mark.parametrize("bad_root", list(BAD_INPUTS), indirect=True)
def test_bad_input_fail_names_id_and_file(bad_root: tuple[Path, int, str], tmp_path: Path) -> None:
    root, bad_id, file = bad_root
    out = tmp_path / "out"
    with pytest.raises(HandposeError) as err:
        pack(root, out, versions="gs", shard_size_mb=0.06, workers=1)
    assert f"id {bad_id} ({file})" in str(err.value)
    # Nothing that looks complete: no manifest, no temporary files; every final-named shard whole.
    assert not (out / "manifest.json").exists()
    for p in out.iterdir() if out.exists() else []:
        assert ".tmp" not in p.name
        if p.suffix == ".tar":
            with tarfile.open(p) as tar:
                n = len(tar.getnames())
            assert n == len(MEMBERS) * int(p.with_suffix(".idx").read_text().split()[1])


@pytest.mark.parametrize("bad_root", list(BAD_INPUTS), indirect=True)
def test_bad_input_skip_lists_it(
    bad_root: tuple[Path, int, str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root, bad_id, file = bad_root
    case = request.node.callspec.params["bad_root"]
    m = pack(root, tmp_path / "out", versions="gs", shard_size_mb=0.06, workers=1, on_error="skip")
    assert [(e["id"], e["file"]) for e in m["skipped"]] == [(bad_id, file)]
    assert REASONS[case] in m["skipped"][0]["reason"]
    assert read_manifest(tmp_path / "out").data == m
    keys = set(read_pack(tmp_path / "out"))
    assert sample_key(bad_id) not in keys and len(keys) == 40 - 1 + 8
    assert sum(m["counts"].values()) == 40 - 1 + 8


def test_unreadable_json_stops_under_both_modes(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "src"
    shutil.copytree(synth_root, root)
    (root / "training_xyz.json").write_text("[[[0.1, 0.2")
    for mode in ("fail", "skip"):
        with pytest.raises(HandposeError, match="training_xyz.json: unreadable json"):
            pack(root, tmp_path / "out", workers=1, on_error=mode)
        assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_bad_options(synth_root: Path, tmp_path: Path) -> None:
    for kwargs, match in (
        ({"fmt": "voc"}, "--format"),
        ({"on_error": "ignore"}, "--on-error"),
        ({"shard_size_mb": 0}, "--shard-size"),
        ({"workers": 0}, "--workers"),
        ({"images": tmp_path}, "--images"),
        ({"versions": "gs,auto"}, "version 'auto'"),
        ({"fmt": "coco", "versions": "all"}, "--versions is only for --format freihand"),
        ({"fmt": "yolo", "versions": "all"}, "--versions is only for --format freihand"),
        ({"split": "0.5,0.5"}, "--split"),
    ):
        with pytest.raises(HandposeError, match=match):
            pack(synth_root, tmp_path / "out", **kwargs)
    with pytest.raises(HandposeError, match="not found"):
        pack(tmp_path / "nope", tmp_path / "out")


def test_cli_error_is_one_line_exit_1(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from typer.testing import CliRunner

    root = tmp_path / "src"
    shutil.copytree(synth_root, root)
    _truncate(root)
    args = ["pack", str(root), str(tmp_path / "out"), "--workers", "1"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1 and isinstance(result.exception, HandposeError)
    assert "id 4 (training/rgb/00000004.jpg): corrupt JPEG" in str(result.exception)
    # The console script's boundary prints it as one message, without a traceback.
    monkeypatch.setattr(sys, "argv", ["handpose", *args])
    monkeypatch.setenv("PYTHONWARNINGS", "default")  # main() sets it if unset; keep the env clean
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert "error: id 4 (training/rgb/00000004.jpg): corrupt JPEG" in " ".join(err.split())


# ---- COCO input -------------------------------------------------------------------------------------


def test_pack_coco_real_samples(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "freihand-mmpose"
    coco = json.loads((folder / "test_freihand.json").read_text())
    m = pack(folder / "test_freihand.json", tmp_path / "out", fmt="coco", workers=1)
    assert m["counts"] == {"train": 6, "val": 1, "test": 1} and m["skipped"] == []
    assert m["source"]["format"] == "coco"
    samples = read_pack(tmp_path / "out")
    for ann in coco["annotations"]:
        s = samples[sample_key(ann["id"])]
        meta = json.loads(s["json"])
        expected = np.array(ann["keypoints"]).reshape(21, 3)[:, :2]
        np.testing.assert_array_equal(meta["uv"], expected)
        np.testing.assert_array_equal(decode_keypoints(s["kp.f32"]), expected.astype(np.float32))
        assert s["jpg"] == (folder / meta["source"]).read_bytes() and "xyz" not in meta
        assert meta["id"] == meta["image_id"] == ann["image_id"]
        assert (meta["width"], meta["height"]) == (224, 224)
        x, y, w, h = ann["bbox"]
        np.testing.assert_array_equal(decode_box(s["box.f32"]), np.float32([x, y, x + w, y + h]))
        assert decode_visibility(s["vis.u8"]).tolist() == [1] * 21


def test_pack_coco_images_option(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "freihand-mmpose"
    (tmp_path / "labels").mkdir()
    shutil.copy(folder / "test_freihand.json", tmp_path / "labels" / "kp.json")
    m = pack(tmp_path / "labels" / "kp.json", tmp_path / "out", fmt="coco", images=folder, split="1,0,0")
    assert m["counts"]["train"] == 8
    with pytest.raises(HandposeError, match="missing image"):
        pack(tmp_path / "labels" / "kp.json", tmp_path / "out2", fmt="coco")  # images not beside the json


def test_pack_coco_several_hands_and_unlabelled_joints(synth_root: Path, tmp_path: Path) -> None:
    for i in range(3):
        shutil.copy(synth_root / f"training/rgb/{i:08d}.jpg", tmp_path / f"{i}.jpg")
    kp = np.array([[20.0 + 3 * j, 30.0 + 5 * j, 2] for j in range(21)])
    hidden = kp.copy()
    hidden[[3, 9], :] = 0  # joints 3 and 9 not labelled: accepted and stored as visibility 0
    anns = [
        {"id": 40, "image_id": 0, "keypoints": kp.ravel().tolist(), "bbox": [10, 20, 80, 120]},
        {"id": 41, "image_id": 0, "keypoints": hidden.ravel().tolist(), "bbox": [100, 110, 50, 60]},
        {"id": 7, "image_id": 1, "keypoints": hidden.ravel().tolist()},  # no bbox: labelled extent
        {"id": 8, "image_id": 2, "keypoints": kp.ravel().tolist()},
    ]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 224, "height": 224} for i in range(3)]
    (tmp_path / "kp.json").write_text(json.dumps({"images": images, "annotations": anns}))
    m = pack(tmp_path / "kp.json", tmp_path / "out", fmt="coco", split="0.34,0.33,0.33", workers=1)
    samples = {k: (json.loads(s["json"]), s) for k, s in read_pack(tmp_path / "out").items()}
    assert sorted(samples) == [sample_key(k) for k in (7, 8, 40, 41)]  # key = annotation id
    (m40, s40), (m41, s41), (m7, s7) = (samples[sample_key(k)] for k in (40, 41, 7))
    assert m40["split"] == m41["split"] == "train" and m7["split"] == "val" and s40["shard"] == s41["shard"]
    assert (m40["hand"], m41["hand"], m40["image_id"]) == (0, 1, 0)
    vis41 = decode_visibility(s41["vis.u8"])
    assert vis41.tolist() == [0 if j in (3, 9) else 2 for j in range(21)] == m41["visibility"]
    np.testing.assert_array_equal(decode_box(s41["box.f32"]), [100, 110, 150, 170])
    labelled = hidden[hidden[:, 2] > 0, :2]
    np.testing.assert_array_equal(decode_box(s7["box.f32"]), [*labelled.min(0), *labelled.max(0)])
    assert m["images"] == {"with_hands": 3, "background": 0}
    assert m["boxes"]["hands_per_image"] == {"mean": round(4 / 3, 6), "max": 2}
    assert m["mean_pose"]["labelled"] == [1 if j in (3, 9) else 2 for j in range(21)]  # train: 40 + 41
    assert_manifest_v2(tmp_path / "out")


@pytest.mark.slow
def test_bench_pack_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from handpose.bench.pack import bench_pack

    result = bench_pack(n=12, workdir=tmp_path, workers=1)
    assert result["images"] == 12 and result["images_per_s"] > 0 and result["decode_images_per_s"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
