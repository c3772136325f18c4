"""`handpose pack --format yolo`: generated datasets with several hands per image and the real
sample read back to 1e-4 px, background images, folder layouts and the dataset yaml, splits by
image, every bad input named by file and line (fail) and listed (skip), determinism, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yolokit
from PIL import Image
from test_pack import assert_manifest_v2, digests, read_pack

from handpose import cli
from handpose.errors import HandposeError
from handpose.imageio import image_size
from handpose.pack import pack
from handpose.shards import decode_box, decode_keypoints, decode_visibility, read_manifest, sample_key

TINY = 0.02  # MB: a few images per shard, so hands of one image could straddle shards if allowed


def check_round_trip(out: Path, src: Path) -> dict[str, dict]:
    """Every sample equals its label line x the displayed image size (1e-4 px), visibility and box
    included; hands of one image share a split and a shard. Returns the samples by key."""
    samples = read_pack(out)
    split_of: dict[str, set[str]] = {}
    shard_of: dict[str, set[str]] = {}
    for key, s in samples.items():
        meta = json.loads(s["json"])
        label, line = meta["label"].rsplit(":", 1)
        box, uv, vis = yolokit.parse((src / label).read_text().splitlines()[int(line) - 1])
        image = (src / meta["source"]).read_bytes()
        w, h = image_size(image)
        assert (meta["width"], meta["height"]) == (w, h) and s["jpg"] == image
        assert key == sample_key(meta["sid"]) and "." not in key
        np.testing.assert_allclose(decode_keypoints(s["kp.f32"]), uv * (w, h), rtol=0, atol=1e-4)
        np.testing.assert_array_equal(decode_visibility(s["vis.u8"]), vis)
        corners = np.concatenate([box[:2] - box[2:] / 2, box[:2] + box[2:] / 2]) * (w, h, w, h)
        np.testing.assert_allclose(decode_box(s["box.f32"]), corners, rtol=0, atol=1e-4)
        split_of.setdefault(meta["source"], set()).add(meta["split"])
        shard_of.setdefault(meta["source"], set()).add(s["shard"])
    assert all(len(v) == 1 for v in split_of.values())  # hands of one image share a split
    assert all(len(v) == 1 for v in shard_of.values())  # ... and a shard
    return samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return yolokit.write_dataset(tmp_path_factory.mktemp("yolo") / "ds", yolokit.default_spec())


@pytest.fixture(scope="module")
def yolo_packed(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("yolo-shards")
    pack(dataset, out, fmt="yolo", shard_size_mb=TINY, workers=1)
    return out


def test_round_trip_several_hands_per_image(yolo_packed: Path, dataset: Path) -> None:
    samples = check_round_trip(yolo_packed, dataset)
    m = read_manifest(yolo_packed).data
    assert m["counts"] == {"train": 9, "val": 6, "test": 0} and len(samples) == 15 and m["skipped"] == []
    assert m["images"] == {"with_hands": 8, "background": 2}
    assert m["boxes"]["hands_per_image"] == {"mean": round(15 / 8, 6), "max": 3}
    assert m["options"]["split"] == "folders" and m["source"]["layout"] == "{split}/images"
    assert len(m["shards"]) > 2
    metas = {json.loads(s["json"])["source"]: json.loads(s["json"]) for s in samples.values()}
    assert (metas["train/images/d.jpg"]["width"], metas["train/images/d.jpg"]["height"]) == (240, 320)  # EXIF
    assert metas["train/images/sub/g.jpg"]["split"] == "train"
    assert {json.loads(s["json"])["class"] for s in samples.values()} == {0, 1}
    hidden = [decode_visibility(s["vis.u8"]) for s in samples.values()]
    assert sum(int((v == 0).sum()) for v in hidden) == 3 * 2 + 2 * 1 + 3  # every v = 0 survived
    assert_manifest_v2(yolo_packed)


def test_shared_sample_round_trip(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "hand-keypoints" / "sample"
    m = pack(src, tmp_path / "out", fmt="yolo", workers=1)
    samples = check_round_trip(tmp_path / "out", src)
    assert m["counts"] == {"train": 200, "val": 100, "test": 0} and len(samples) == 300
    assert m["images"] == {"with_hands": 300, "background": 0} and m["skipped"] == []
    assert any((decode_visibility(s["vis.u8"]) == 0).any() for s in samples.values())  # some unlabelled
    assert 0.95 < m["keypoint_bounds"]["labelled_fraction"] < 1
    assert_manifest_v2(tmp_path / "out")


def test_layouts_and_yaml_give_the_same_hands(yolo_packed: Path, tmp_path: Path) -> None:
    spec = yolokit.default_spec()
    want = {k: (s["kp.f32"], s["vis.u8"], s["box.f32"], s["jpg"]) for k, s in read_pack(yolo_packed).items()}
    other = yolokit.write_dataset(tmp_path / "b", spec, layout="images/{split}")
    (tmp_path / "data.yaml").write_text(
        "path: b  # relative to the yaml\ntrain: images/train\nval: [images/val]\ntest:\nkpt_shape: [21, 3]\n"
    )
    for n, src in enumerate((other, tmp_path / "data.yaml")):
        m = pack(src, tmp_path / f"out{n}", fmt="yolo", shard_size_mb=TINY, workers=1)
        got = {
            k: (s["kp.f32"], s["vis.u8"], s["box.f32"], s["jpg"])
            for k, s in read_pack(tmp_path / f"out{n}").items()
        }
        assert got == want and m["images"] == {"with_hands": 8, "background": 2}
        assert m["source"]["layout"] == ("images/{split}", "yaml")[n]


def test_one_folder_is_split_by_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    imgs = [
        yolokit.Img(f"p{i:02d}", 96, 64, [yolokit.hand_line(rng) for _ in range(1 + i % 3)])
        for i in range(20)
    ]
    src = yolokit.write_dataset(tmp_path / "flat", yolokit.Spec({None: imgs}))
    m = pack(
        src, tmp_path / "out", fmt="yolo", split="0.5,0.25,0.25", split_seed=1, shard_size_mb=TINY, workers=1
    )
    samples = check_round_trip(tmp_path / "out", src)  # asserts one split per image
    split_of = {json.loads(s["json"])["source"]: json.loads(s["json"])["split"] for s in samples.values()}
    assert [list(split_of.values()).count(s) for s in ("train", "val", "test")] == [10, 5, 5]  # images
    assert sorted(k for k, v in split_of.items() if v == "train") != [
        f"images/p{i:02d}.jpg" for i in range(10)
    ]
    assert sum(m["counts"].values()) == sum(1 + i % 3 for i in range(20))
    assert m["options"]["split"] == [0.5, 0.25, 0.25] and m["source"]["layout"] == "images"


def test_split_options_refused_for_split_folders(dataset: Path, tmp_path: Path) -> None:
    for kwargs, flag in (({"split": "1,0,0"}, "--split"), ({"split_seed": 3}, "--split-seed")):
        with pytest.raises(HandposeError, match=f"{flag}: .* has its own split folders"):
            pack(dataset, tmp_path / "out", fmt="yolo", **kwargs)
    assert not (tmp_path / "out").exists()


def test_background_only_is_an_error(tmp_path: Path) -> None:
    src = yolokit.write_dataset(tmp_path / "bg", yolokit.Spec({"train": [yolokit.Img("a", 64, 64, None)]}))
    with pytest.raises(HandposeError, match=r"no samples to pack \(0 skipped, 1 background images\)"):
        pack(src, tmp_path / "out", fmt="yolo", split="1,0,0")


# ---- bad input: the file and line, fail or skip --------------------------------------------------------


def _edit_line(name: str, line: int, edit):
    def apply(root: Path) -> None:
        path = root / name
        lines = path.read_text().splitlines()
        lines[line - 1] = " ".join(edit(lines[line - 1].split()))
        path.write_text("\n".join(lines) + "\n")

    return apply


def _write(name: str, data):
    def apply(root: Path) -> None:
        (root / name).write_bytes(data(root) if callable(data) else data)

    return apply


def _png(root: Path) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (320, 240)).save(buf, format="PNG")
    return buf.getvalue()


# case: (damage, expected message (fail), {skipped file: reason part}, hands lost)
BAD = {
    "field count": (
        _edit_line("train/labels/b.txt", 2, lambda f: f[:62]),
        "train/labels/b.txt:2: 62 fields, expected 68 (class, box, 21 x (x, y, v)) or 47",
        {"train/labels/b.txt:2": "62 fields"},
        1,
    ),
    "not a number": (
        _edit_line("train/labels/a.txt", 1, lambda f: f[:6] + ["0.3x"] + f[7:]),
        "train/labels/a.txt:1: field 7 '0.3x' is not a number",
        {"train/labels/a.txt:1": "is not a number"},
        1,
    ),
    "outside [0, 1]": (
        _edit_line("val/labels/j.txt", 3, lambda f: f[:8] + ["1.5"] + f[9:]),
        "val/labels/j.txt:3: keypoint 1 x = 1.5 is outside [0, 1] (tolerance 0.02)",
        {"val/labels/j.txt:3": "outside [0, 1]"},
        1,
    ),
    "17 keypoints": (
        _edit_line("train/labels/c.txt", 1, lambda f: f[:56]),
        "train/labels/c.txt:1: 56 fields, expected 68",
        {"train/labels/c.txt:1": "17 keypoints of (x, y, v)"},
        1,
    ),
    "label without image": (
        _write("train/labels/ghost.txt", b"0 0.5 0.5 0.1 0.1\n"),
        "train/labels/ghost.txt: no image ghost.* for this label",
        {"train/labels/ghost.txt": "no image"},
        0,
    ),
    "corrupt image": (
        _write("train/images/c.jpg", lambda r: (r / "train/images/c.jpg").read_bytes()[:-300]),
        "train/images/c.jpg: corrupt JPEG",
        {"train/images/c.jpg": "corrupt JPEG"},
        2,  # both hands of the photo
    ),
    "png image": (
        _write("train/images/a.jpg", _png),
        "train/images/a.jpg: PNG image: pack stores JPEG only (convert it to JPEG)",
        {"train/images/a.jpg": "PNG image"},
        1,
    ),
}


@pytest.fixture
def bad_dataset(dataset: Path, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str]:
    root = tmp_path / "src"
    shutil.copytree(dataset, root)
    BAD[request.param][0](root)
    return root, request.param


@pytest.mark.parametrize("bad_dataset", list(BAD), indirect=True)
def test_bad_input_fail_names_file_and_line(bad_dataset: tuple[Path, str], tmp_path: Path) -> None:
    root, case = bad_dataset
    with pytest.raises(HandposeError) as err:
        pack(root, tmp_path / "out", fmt="yolo", shard_size_mb=TINY, workers=1)
    assert BAD[case][1] in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("bad_dataset", list(BAD), indirect=True)
def test_bad_input_skip_lists_it(bad_dataset: tuple[Path, str], tmp_path: Path) -> None:
    root, case = bad_dataset
    _, _, listed, lost = BAD[case]
    m = pack(root, tmp_path / "out", fmt="yolo", shard_size_mb=TINY, workers=1, on_error="skip")
    assert {e["file"] for e in m["skipped"]} == set(listed)
    assert all(listed[e["file"]] in e["reason"] for e in m["skipped"])
    assert sum(m["counts"].values()) == 15 - lost == len(read_pack(tmp_path / "out"))
    assert len(m["skipped"]) == max(lost, 1)
    if case == "corrupt image":  # one entry per hand of the photo, told apart by key
        assert len({e["key"] for e in m["skipped"]}) == 2
    check_round_trip(tmp_path / "out", root)


def test_cli_bad_label_is_one_line(dataset: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    root = tmp_path / "src"
    shutil.copytree(dataset, root)
    BAD["field count"][0](root)
    result = CliRunner().invoke(cli.app, ["pack", str(root), str(tmp_path / "out"), "--format", "yolo"])
    assert result.exit_code == 1 and isinstance(result.exception, HandposeError)
    assert "train/labels/b.txt:2: 62 fields" in str(result.exception)


# ---- determinism and resume ----------------------------------------------------------------------------


def test_same_bytes_with_one_and_two_workers(yolo_packed: Path, dataset: Path, tmp_path: Path) -> None:
    manifest = pack(dataset, tmp_path / "w2", fmt="yolo", shard_size_mb=TINY, workers=2)
    assert digests(tmp_path / "w2") == digests(yolo_packed)
    assert manifest == json.loads((yolo_packed / "manifest.json").read_text())


def test_changed_label_repacks_on_resume(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import handpose.pack as packmod

    src = tmp_path / "src"
    shutil.copytree(dataset, src)
    real, calls = packmod.write_shard, []

    def interrupted(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[0].name)
        return real(*args)

    monkeypatch.setattr(packmod, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path / "out", fmt="yolo", shard_size_mb=TINY, workers=1)
    assert calls[0] == "train-000000.tar"  # holds a.jpg's hand, now done
    _edit_line("train/labels/a.txt", 1, lambda f: f[:7] + ["0"] + f[8:])(src)  # joint 0: not labelled
    monkeypatch.setattr(packmod, "write_shard", lambda *a: calls.append(a[0].name) or real(*a))
    pack(src, tmp_path / "out", fmt="yolo", shard_size_mb=TINY, workers=1)
    assert calls[2:].count("train-000000.tar") == 1 and "train-000001.tar" not in calls[2:]  # redone; kept
    pack(src, tmp_path / "fresh", fmt="yolo", shard_size_mb=TINY, workers=1)
    assert digests(tmp_path / "out") == digests(tmp_path / "fresh")
    assert decode_visibility(read_pack(tmp_path / "out")[sample_key(0)]["vis.u8"])[0] == 0


def test_bench_pack_a_real_data_set(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`bench pack --src ROOT --format yolo` into a work folder that does not exist yet: it packs
    every image and hand of the data set and reports them."""
    from handpose.bench.pack import bench_pack

    result = bench_pack(workdir=tmp_path / "new" / "work", workers=1, src=dataset, fmt="yolo")
    manifest = read_manifest(tmp_path / "new" / "work" / "shards")
    assert result["images"] == len([p for p in dataset.rglob("*.jpg")])
    assert result["hands"] == sum(manifest.data["counts"].values()) > result["images"] // 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
