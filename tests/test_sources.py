"""Readers (handpose.sources): FreiHAND, COCO and YOLO-pose -> validated hands, every problem named."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yolokit

from handpose.errors import HandposeError
from handpose.geometry import keypoints_box, project_points
from handpose.shards import EVAL_SID_OFFSET, sample_key
from handpose.sources import read_source
from handpose.sources.coco import check_coco_keypoints, read_coco
from handpose.sources.files import walk
from handpose.sources.freihand import check_K, check_xyz, parse_versions, read_freihand
from handpose.sources.yolo import (
    find_folders,
    is_dataset_folder,
    label_path,
    parse_box_line,
    parse_line,
    read_yolo,
)

MMPOSE = "freihand-mmpose"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # json.dumps writes NaN as NaN, which json.load accepts


def test_parse_versions() -> None:
    assert parse_versions("gs") == (0,)
    assert parse_versions("hom, gs") == (0, 1)
    assert parse_versions("ALL") is None
    for bad in ("", "green", "gs,,x"):
        with pytest.raises(HandposeError, match="--versions"):
            parse_versions(bad)


def test_read_freihand_records_and_labels(synth_root: Path) -> None:
    data = read_freihand(synth_root, None)
    xyz = np.array(json.loads((synth_root / "training_xyz.json").read_text()))
    K = np.array(json.loads((synth_root / "training_K.json").read_text()))
    n = len(xyz)
    train = [r for r in data.records if not r.evaluation]
    evals = [r for r in data.records if r.evaluation]
    assert data.problems == [] and data.ids == list(range(n))
    assert data.source["versions"] == ["gs", "hom"] and data.source["evaluation_ids"] == 8
    assert len(train) == 2 * n and len(evals) == 2 * 8
    for r in train:
        number = r.id + n * r.version  # file number = id + N * v; sid = file number
        assert r.sid == number and r.file == f"training/rgb/{number:08d}.jpg" and r.path.is_file()
        np.testing.assert_allclose(r.uv, project_points(xyz[r.id], K[r.id]), atol=1e-9)
        assert r.hand == 0 and r.split is None and not r.normalised
        assert r.visibility.dtype == np.uint8 and r.visibility.tolist() == [1] * 21
        np.testing.assert_array_equal(r.box, [*r.uv.min(0), *r.uv.max(0)])  # the keypoints' extent
    assert all(r.sid >= EVAL_SID_OFFSET and r.file.startswith("evaluation/rgb/") for r in evals)
    assert all(r.split == "eval" and r.evaluation for r in evals)


def test_read_freihand_versions(synth_root: Path) -> None:
    assert {r.version for r in read_freihand(synth_root, (0,)).records} == {0}
    with pytest.raises(HandposeError, match="version 'sample'"):
        read_freihand(synth_root, (2,))  # no images of that version at all: an option error


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([[0.0, 0.0, 0.5]] * 20, "shape"),
        ([[0.0, 0.0, float("nan")]] * 21, "non-finite"),
        ([[0.0, 0.0, 0.5]] * 20 + [[0.0, 0.0, -0.1]], "z = -0.1"),
        ([[0.0, 0.0, 0.5]] * 20 + [[0.0, 0.0, 0.0]], "z = 0"),
        ("abc", "numeric"),
        ([[0.0, 0.0]] * 21, "shape"),
    ],
)
def test_check_xyz_names_the_problem(value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_xyz(value)


def test_check_K_and_coco_keypoints() -> None:
    assert check_K(np.eye(3).tolist()).shape == (3, 3)
    with pytest.raises(ValueError, match="shape"):
        check_K([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="focal"):
        check_K([[0, 0, 1], [0, 1, 1], [0, 0, 1]])
    kp = [v for j in range(21) for v in (j, 2 * j, 1 + j % 2)]
    uv, vis = check_coco_keypoints(kp)
    np.testing.assert_array_equal(uv, np.array([[j, 2 * j] for j in range(21)]))
    assert vis.dtype == np.uint8 and vis.tolist() == [1 + j % 2 for j in range(21)]
    uv, vis = check_coco_keypoints(kp[:11] + [0] + kp[12:])  # not labelled: accepted, marked 0
    assert vis[3] == 0 and vis.sum() == sum(1 + j % 2 for j in range(21)) - 2
    with pytest.raises(ValueError, match="no labelled keypoint"):
        check_coco_keypoints([v for j in range(21) for v in (j, j, 0)])
    with pytest.raises(ValueError, match="keypoint 2 has visibility 3"):
        check_coco_keypoints(kp[:8] + [3] + kp[9:])
    with pytest.raises(ValueError, match="shape"):
        check_coco_keypoints(kp[:-3])


def test_label_problems_name_id_and_file(synth_root: Path, tmp_path: Path) -> None:
    root = _copy(synth_root, tmp_path / "root")

    def edit(xyz: list) -> None:
        xyz[3][0][0] = float("nan")
        xyz[5] = xyz[5][:20]
        xyz[7][4][2] = -0.1

    _edit_json(root / "training_xyz.json", edit)
    _edit_json(root / "training_K.json", lambda K: K.pop())  # K one shorter: the last id has no K
    (root / "training/rgb/00000011.jpg").unlink()
    data = read_freihand(root, (0,))
    got = {(p.id, p.file): p.reason for p in data.problems}
    assert set(got) == {(i, f"training/rgb/{i:08d}.jpg") for i in (3, 5, 7, 11, 39)}
    assert "training_xyz.json entry 3" in got[(3, "training/rgb/00000003.jpg")]
    assert "shape" in got[(5, "training/rgb/00000005.jpg")]
    assert "z = -0.1" in got[(7, "training/rgb/00000007.jpg")]
    assert got[(11, "training/rgb/00000011.jpg")] == "missing image"
    assert "training_K.json has no entry 39" in got[(39, "training/rgb/00000039.jpg")]
    assert len(data.records) == 40 - 5 + 8  # the evaluation set is untouched
    assert data.ids == list(range(40))  # bad ids still count for the split


def test_unreadable_json_is_an_error_naming_the_file(synth_root: Path, tmp_path: Path) -> None:
    root = _copy(synth_root, tmp_path / "root")
    (root / "training_K.json").write_text("[[[1, 0, 0], [0, 1, 0], [0, 0, 1]]")
    with pytest.raises(HandposeError, match="training_K.json: unreadable json"):
        read_freihand(root)
    (root / "training_K.json").write_text('{"not": "a list"}')
    with pytest.raises(HandposeError, match="training_K.json: expected a json list"):
        read_freihand(root)


def test_not_a_freihand_root(tmp_path: Path) -> None:
    with pytest.raises(HandposeError, match="not a FreiHAND root"):
        read_freihand(tmp_path)


def test_read_coco_real_samples(shared_data: Path) -> None:
    folder = shared_data / MMPOSE
    coco = json.loads((folder / "test_freihand.json").read_text())
    data = read_coco(folder / "test_freihand.json")
    assert data.problems == [] and len(data.records) == 8
    by_sid = {r.sid: r for r in data.records}
    for ann in coco["annotations"]:
        r = by_sid[ann["id"]]
        assert (
            r.id == r.image_id == ann["image_id"] and r.xyz is None and r.K is None and r.size == (224, 224)
        )
        assert r.file == f"{ann['image_id']:08d}.jpg" and r.path.is_file() and r.hand == 0
        np.testing.assert_array_equal(r.uv, np.array(ann["keypoints"]).reshape(21, 3)[:, :2])
        x, y, w, h = ann["bbox"]
        np.testing.assert_array_equal(r.box, [x, y, x + w, y + h])
    assert data.ids == sorted(r.image_id for r in data.records) and data.background == 0


def _coco(tmp_path: Path, synth_root: Path, anns: list[dict], n_images: int = 6) -> Path:
    for i in range(min(n_images, 4)):
        shutil.copy(synth_root / f"training/rgb/{i:08d}.jpg", tmp_path / f"{i}.jpg")
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 224, "height": 224} for i in range(n_images)]
    (tmp_path / "kp.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return tmp_path / "kp.json"


def test_read_coco_several_hands_visibility_and_boxes(tmp_path: Path, synth_root: Path) -> None:
    kp = [v for j in range(21) for v in (10.0 + j, 20.0 + 2 * j, 2)]
    hidden = list(kp)
    hidden[3 * 5 : 3 * 5 + 3] = [0, 0, 0]  # joint 5 not labelled
    anns = [
        {"id": 31, "image_id": 2, "keypoints": hidden, "bbox": [5, 6, 50, 70]},
        {"id": 7, "image_id": 2, "keypoints": kp},  # no bbox: the keypoints' extent
        {"id": 12, "image_id": 0, "keypoints": kp, "bbox": [1.5, 2.5, 3, 4]},
    ]
    data = read_coco(_coco(tmp_path, synth_root, anns))
    assert data.problems == [] and data.ids == [0, 2] and data.background == 4
    by_sid = {r.sid: r for r in data.records}
    assert sorted(by_sid) == [7, 12, 31]  # sid = the annotation id
    assert [(by_sid[s].image_id, by_sid[s].hand) for s in (7, 31, 12)] == [(2, 0), (2, 1), (0, 0)]
    assert {by_sid[7].id, by_sid[31].id} == {2}  # the split unit is the image
    assert by_sid[31].visibility[5] == 0 and by_sid[31].visibility.sum() == 2 * 20
    np.testing.assert_array_equal(by_sid[31].box, [5, 6, 55, 76])
    np.testing.assert_array_equal(by_sid[7].box, keypoints_box(by_sid[7].uv))
    np.testing.assert_array_equal(by_sid[12].box, [1.5, 2.5, 4.5, 6.5])
    assert any("4 images have no annotation" in n for n in data.notes)


def test_read_coco_problems(tmp_path: Path, synth_root: Path) -> None:
    kp = [v for j in range(21) for v in (10.0 + j, 20.0 + j, 2)]
    anns = [
        {"id": 1, "image_id": 0, "keypoints": kp},
        {"id": 2, "image_id": 1, "keypoints": kp[:-3]},  # 20 keypoints
        {"id": 3, "image_id": 2, "keypoints": kp, "bbox": [1, 2, 0, 5]},  # empty box
        {"id": 4, "image_id": 2, "keypoints": kp, "bbox": [1, 2, "x", 5]},
        {"id": 5, "image_id": 3, "keypoints": [v if k % 3 != 2 else 0 for k, v in enumerate(kp)]},
        {"id": 6, "image_id": 4, "keypoints": kp},  # no such file
        {"id": 7, "image_id": 99, "keypoints": kp},  # no such image entry
    ]  # image 5 has no annotation
    data = read_coco(_coco(tmp_path, synth_root, anns))
    assert [r.sid for r in data.records] == [1]
    reasons = {p.key: p.message() for p in data.problems}
    assert set(reasons) == {sample_key(k) for k in (2, 3, 4, 5, 6)}
    assert "id 1 (1.jpg): kp.json annotation 2: keypoints has shape (60,)" in reasons[sample_key(2)]
    assert "annotation 3: bbox [1, 2, 0, 5] has a width or height <= 0" in reasons[sample_key(3)]
    assert "annotation 4: bbox is not a numeric array" in reasons[sample_key(4)]
    assert "annotation 5: no labelled keypoint" in reasons[sample_key(5)]
    assert reasons[sample_key(6)] == "id 4 (4.jpg): missing image"
    assert data.ids == [0, 1, 2, 3, 4]  # images with a bad annotation still count for the split
    assert any("1 images have no annotation" in n for n in data.notes)
    assert any("1 annotations refer to no listed image" in n for n in data.notes)


def test_read_coco_annotation_ids(tmp_path: Path, synth_root: Path) -> None:
    kp = [v for j in range(21) for v in (10.0 + j, 20.0 + j, 2)]
    for anns, match in (
        ([{"image_id": 0, "keypoints": kp}], r"annotations\[0\] has no integer id"),
        ([{"id": 3, "image_id": 0, "keypoints": kp}] * 2, "annotation id 3 appears twice"),
        ([{"id": 10**10, "image_id": 0, "keypoints": kp}], r"annotations\[0\] has no integer id"),
    ):
        with pytest.raises(HandposeError, match=match):
            read_coco(_coco(tmp_path, synth_root, anns))


def test_read_coco_bad_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(HandposeError, match="not a COCO json"):
        read_coco(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "x"}] * 2, "annotations": []})
    )
    with pytest.raises(HandposeError, match="image id 1 appears twice"):
        read_coco(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "x"}, {"id": 2, "file_name": "x"}], "annotations": []})
    )
    with pytest.raises(HandposeError, match="file_name 'x' is listed twice"):
        read_coco(tmp_path / "c.json")
    with pytest.raises(HandposeError, match="file not found"):
        read_coco(tmp_path / "missing.json")


# ---- YOLO-pose ------------------------------------------------------------------------------------


def test_label_path_is_ultralytics_rule() -> None:
    assert label_path(Path("/d/train/images/a.jpg")) == Path("/d/train/labels/a.txt")
    assert label_path(Path("/d/images/train/sub/b.PNG")) == Path("/d/labels/train/sub/b.txt")
    assert label_path(Path("/images/x/images/c.jpeg")) == Path("/images/x/labels/c.txt")  # the last one
    assert label_path(Path("/d/photos/e.jpg")) == Path("/d/photos/e.txt")  # no images folder: beside


def _fields(n_kp: int = 21, dims: int = 3) -> list[str]:
    kp = [f for j in range(n_kp) for f in (f"{0.3 + j / 100:.3f}", "0.5", "2")[:dims]]
    return ["0", "0.5", "0.5", "0.4", "0.6", *kp]


def test_parse_line_values() -> None:
    hand = parse_line(_fields(), 3)
    np.testing.assert_allclose(hand.box, [0.3, 0.2, 0.7, 0.8])
    np.testing.assert_allclose(hand.uv[:, 0], [0.3 + j / 100 for j in range(21)])
    assert hand.visibility.tolist() == [2] * 21 and hand.cls == 0
    two = parse_line(_fields(dims=2)[:-2] + ["-1", "-1"], None)  # inferred (x, y); a negative: hidden
    assert two.visibility.tolist() == [1] * 20 + [0]
    edge = _fields()
    edge[5], edge[6] = "1.015", "-0.01"  # within the tolerance: kept as given, not clamped
    np.testing.assert_array_equal(parse_line(edge, 3).uv[0], [1.015, -0.01])
    hidden = _fields()
    hidden[5:8] = ["7", "-3", "0"]  # a joint that is not labelled is not range-checked
    assert parse_line(hidden, 3).visibility[0] == 0


@pytest.mark.parametrize(
    ("edit", "dims", "message"),
    [
        (lambda f: f[:-6], 3, "62 fields, expected 68 (class, box, 21 x (x, y, v))"),
        (lambda f: f[:-6], None, "62 fields, expected 68 (class, box, 21 x (x, y, v)) or 47 (class, box,"),
        (
            lambda f: f[:56],
            3,
            "56 fields, expected 68 (class, box, 21 x (x, y, v)); 56 fields would be 17 keypoints",
        ),
        (lambda f: _fields(dims=2), 3, "47 fields, expected 68"),
        (lambda f: f[:5], None, "a box without keypoints"),
        (lambda f: f[:8] + ["abc"] + f[9:], 3, "field 9 'abc' is not a number"),
        (lambda f: f[:8] + ["nan"] + f[9:], 3, "field 9 is nan"),
        (lambda f: ["0.5"] + f[1:], 3, "class '0.5' is not a whole number"),
        (lambda f: f[:11] + ["1.05"] + f[12:], 3, "keypoint 2 x = 1.05 is outside [0, 1] (tolerance 0.02)"),
        (lambda f: f[:1] + ["-0.1"] + f[2:], 3, "box cx = -0.1 is outside"),
        (lambda f: f[:3] + ["0"] + f[4:], 3, "box w = 0, h = 0.6: an empty box"),
        (lambda f: f[:13] + ["0.5"] + f[14:], 3, "keypoint 2 has visibility 0.5"),
        (
            lambda f: [v if k < 5 or (k - 5) % 3 != 2 else "0" for k, v in enumerate(f)],
            3,
            "no labelled keypoint",
        ),
    ],
)
def test_parse_line_problems(edit, dims: int | None, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_line(edit(_fields()), dims)
    assert message in str(err.value)


def test_read_yolo_records(tmp_path: Path) -> None:
    spec = yolokit.default_spec()
    data = read_yolo(yolokit.write_dataset(tmp_path / "ds", spec))
    assert data.problems == [] and data.own_splits and data.ids == [] and data.background == 2
    order = [
        (split, im) for split in ("train", "val") for im in sorted(spec.splits[split], key=lambda i: i.name)
    ]
    by_sid = {r.sid: r for r in data.records}
    n = 0
    for ordinal, (split, im) in enumerate(order):  # ordinal: every image in (split, path) order
        for hand, line in enumerate(im.lines or []):
            r = by_sid[ordinal * 1000 + hand]
            box, uv, vis = yolokit.parse(line)
            assert (r.id, r.hand, r.split, r.file) == (ordinal, hand, split, f"{split}/images/{im.name}.jpg")
            assert r.label == f"{split}/labels/{im.name}.txt:{hand + 1}" and r.normalised
            np.testing.assert_array_equal(r.uv, uv)
            np.testing.assert_array_equal(r.visibility, vis)
            np.testing.assert_allclose(r.box, [*(box[:2] - box[2:] / 2), *(box[:2] + box[2:] / 2)])
            n += 1
    assert len(data.records) == n == 15
    assert data.source["layout"] == "{split}/images" and data.source["images"] == 10


def test_read_yolo_in_pixels(tmp_path: Path) -> None:
    spec = yolokit.Spec(
        {"train": [yolokit.Img("a", 300, 200, [yolokit.hand_line(np.random.default_rng(0))])]}
    )
    (r,) = read_yolo(yolokit.write_dataset(tmp_path, spec)).records
    uv, box = r.in_pixels(300, 200)
    np.testing.assert_array_equal(uv, r.uv * [300, 200])
    np.testing.assert_array_equal(box, r.box * [300, 200, 300, 200])


def test_find_folders_layouts(tmp_path: Path) -> None:
    for split in ("train", "valid", "test"):
        (tmp_path / "a" / split / "images").mkdir(parents=True)
        (tmp_path / "b" / "images" / split).mkdir(parents=True)
    (tmp_path / "c" / "images").mkdir(parents=True)
    (tmp_path / "d" / "train" / "images").mkdir(parents=True)
    folders, layout = find_folders(tmp_path / "a")
    assert layout == "{split}/images" and [(f.split, f.images.name) for f in folders] == [
        ("train", "images"),
        ("val", "images"),
        ("test", "images"),
    ]
    assert folders[1].images == tmp_path / "a" / "valid" / "images"  # Roboflow's name for val
    folders, layout = find_folders(tmp_path / "b")
    assert layout == "images/{split}" and [f.images.name for f in folders] == ["train", "valid", "test"]
    (tmp_path / "b" / "images" / "loose.jpg").write_bytes(b"")
    assert "images/: 1 images outside the split folders: not packed" in read_yolo(tmp_path / "b").notes
    folders, layout = find_folders(tmp_path / "c")
    assert layout == "images" and [f.split for f in folders] == [None]
    folders, _ = find_folders(tmp_path / "d")
    assert [f.split for f in folders] == [None]  # a dataset in one split is re-split by --split
    (tmp_path / "a" / "val" / "images").mkdir(parents=True)
    with pytest.raises(HandposeError, match="val/images and valid/images are both split 'val'"):
        find_folders(tmp_path / "a")
    (tmp_path / "b" / "train" / "images").mkdir(parents=True)
    with pytest.raises(HandposeError, match="both SRC/{split}/images and SRC/images/{split}"):
        find_folders(tmp_path / "b")
    with pytest.raises(HandposeError, match="no YOLO dataset here"):
        find_folders(tmp_path)


def test_walk_is_the_one_folder_walk(tmp_path: Path) -> None:
    """Every folder of images (a plain folder for predict, a YOLO split for pack and predict) is
    walked alike: image suffixes of any case (Ultralytics' list, .tif included), relative-path
    order, hidden names, symlinked folders and the skipped output folder left out."""
    for rel in ("b.JPG", "a.png", "a/x.tif", "a-b/y.webp", ".hidden.jpg", "notes.txt", "a/.git/z.jpg"):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / rel).write_bytes(b"")
    (tmp_path / "in" / "out").mkdir()
    (tmp_path / "in" / "out" / "o.png").write_bytes(b"")
    (tmp_path / "in" / "link").symlink_to(tmp_path / "in" / "a", target_is_directory=True)
    found = [
        Path(p).relative_to(tmp_path / "in").as_posix()
        for p in walk(tmp_path / "in", skip=tmp_path / "in" / "out")
    ]
    assert found == ["a-b/y.webp", "a.png", "a/x.tif", "b.JPG"]
    assert [Path(p).name for p in walk(tmp_path / "in", lambda n: n.endswith(".txt"))] == ["notes.txt"]
    (tmp_path / "in" / "images").mkdir()
    assert not is_dataset_folder(tmp_path / "in")  # images/ alone: a folder of photos
    (tmp_path / "in" / "labels").mkdir()
    assert is_dataset_folder(tmp_path / "in") and is_dataset_folder(tmp_path / "in" / "a" / "..")


def test_parse_box_line_shares_the_pose_rules() -> None:
    """A --boxes label line: `class cx cy w h [conf]` or a pose line, its class and box checked by
    the pose labels' rules."""
    box, score = parse_box_line("0 0.5 0.5 0.2 0.4 0.7".split())
    assert np.allclose(box, [0.4, 0.3, 0.6, 0.7]) and score == 0.7
    assert parse_box_line("0 0.5 0.5 0.2 0.4".split())[1] is None
    pose = _fields()
    assert np.allclose(parse_box_line(pose)[0], parse_line(pose, 3).box)
    assert parse_box_line([*pose, "0.25"])[1] == 0.25
    for fields, message in (
        ("0 0.5 0.5 1.5 0.4", "box w = 1.5 is outside [0, 1]"),
        ("1.5 0.5 0.5 0.2 0.4", "class '1.5' is not a whole number >= 0"),
        ("0 0.5 x 0.2 0.4", "field 3 'x' is not a number"),
        ("0 0.5 0.5 0.2 0.4 1.7", "field 6 = 1.7: a confidence must be in [0, 1]"),
        ("0 0.5 0.5", "3 fields, expected class cx cy w h [conf] or a pose line"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_box_line(fields.split())


def test_read_yolo_problems_and_background(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    spec = yolokit.Spec(
        {
            "train": [
                yolokit.Img("ok", 200, 200, [yolokit.hand_line(rng), "0 0.5", yolokit.hand_line(rng)]),
                yolokit.Img("many", 64, 64, [yolokit.hand_line(rng)] * 1001),
                yolokit.Img("twin", 64, 64, [yolokit.hand_line(rng)]),
                yolokit.Img("bg", 64, 64, None),
            ]
        }
    )
    root = yolokit.write_dataset(tmp_path, spec)
    (root / "train/images/twin.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # shares twin.txt
    (root / "train/labels/ghost.txt").write_text(yolokit.hand_line(rng) + "\n")
    (root / "train/labels/classes.txt").write_text("hand\n")
    (root / "train/labels/sub").mkdir()
    (root / "train/labels/sub/bad.txt").write_bytes(b"\xff\xfe\x00")
    (root / "train/images/sub").mkdir()
    (root / "train/images/sub/bad.jpg").write_bytes(yolokit.jpeg(64, 64, 0))
    data = read_yolo(root)
    got = {p.file: p.reason for p in data.problems}
    assert all(p.id is None for p in data.problems)  # YOLO problems are named by file (and line)
    assert got == {
        "train/labels/ok.txt:2": "2 fields, expected 68 (class, box, 21 x (x, y, v)) or 47 (class, box, "
        "21 x (x, y))",
        "train/labels/many.txt": "1001 hands; at most 1000 per image",
        "train/labels/twin.txt": "is the label of 2 images (twin.jpg, twin.png); rename one",
        "train/labels/ghost.txt": "no image ghost.* for this label",
        "train/labels/sub/bad.txt": "not a text file (not UTF-8)",
    }
    ok = [r for r in data.records if r.file == "train/images/ok.jpg"]
    assert [r.hand for r in ok] == [0, 2]  # the bad line keeps its number: no key moves
    assert data.background == 1 and any("classes.txt" in n for n in data.notes)


YAML = """\
# Ultralytics-style dataset yaml
path: {path}  # dataset root dir
train: {train} # train images (relative to 'path')
val: [{val}]
test:  # optional

# Keypoints
kpt_shape: [21, {dims}]  # number of keypoints, number of dims
flip_idx: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
names:
  0: hand
download: |
  from pathlib import Path
  # train: not/this
  print("test: no")
"""


def test_read_yolo_from_yaml(tmp_path: Path) -> None:
    spec = yolokit.default_spec(dims=2)
    root = yolokit.write_dataset(tmp_path / "datasets" / "hands", spec, layout="images/{split}")
    cfg = tmp_path / "cfg" / "hands.yaml"
    cfg.parent.mkdir()
    cfg.write_text(YAML.format(path="../datasets/hands", train="images/train", val="images/val", dims=2))
    data = read_yolo(cfg)
    folders = read_yolo(root)  # the same data read as folders: the same hands
    assert data.problems == [] and data.source["kpt_shape"] == [21, 2] and data.source["layout"] == "yaml"
    assert [(r.sid, r.file, r.split) for r in data.records] == [
        (r.sid, r.file, r.split) for r in folders.records
    ]
    for a, b in zip(data.records, folders.records, strict=True):
        np.testing.assert_array_equal(a.uv, b.uv)
        np.testing.assert_array_equal(a.visibility, b.visibility)
    assert data.records[0].file == "images/train/a.jpg" and data.background == 2

    # kpt_shape [21, 3] refuses the 47-field lines with the file and line
    cfg.write_text(YAML.format(path="../datasets/hands", train="images/train", val="images/val", dims=3))
    messages = [p.message() for p in read_yolo(cfg).problems]
    assert "labels/train/a.txt:1: 47 fields, expected 68 (class, box, 21 x (x, y, v))" in messages[0]


def test_yaml_roboflow_paths_and_errors(tmp_path: Path) -> None:
    root = yolokit.write_dataset(tmp_path / "export", yolokit.default_spec())
    (root / "val").rename(root / "valid")
    cfg = root / "data.yaml"
    cfg.write_text("train: ../train/images\nval: ../valid/images\nkpt_shape: [21, 3]\n")
    data = read_yolo(cfg)  # no path: the yaml's folder; '../x' missing there means 'x' (Ultralytics)
    assert data.problems == [] and {r.split for r in data.records} == {"train", "val"}
    for text, message in (
        ("train: train/images\nval: train/images\n", "overlap: an image would be packed twice"),
        ("train: train/images\nkpt_shape: [17, 3]\n", "kpt_shape [17, 3]: handpose reads 21 keypoints"),
        ("train: train.txt\n", "train.txt is an image list file"),
        ("train: nowhere\n", "data.yaml: train: folder 'nowhere' not found"),
        ("path: /no/such/root\ntrain: a\n", "data.yaml: path '/no/such/root': folder not found"),
        ("train: [a, b\n", "data.yaml: invalid YAML: expected ',' or ']', but got '<stream end>' (line 2)"),
        ("train: *anchor\n", "data.yaml: invalid YAML: found undefined alias 'anchor' (line 1)"),
        ("- train\n- val\n", "data.yaml: expected 'key: value' entries"),
        ("train: {a: b}\n", "data.yaml: train: expected a folder or a list of folders"),
        ("kpt_shape: [21, '3']\ntrain: train/images\n", "kpt_shape [21, '3']: expected [21, 3] or [21, 2]"),
        ("names: x\n", "no train, val or test folder"),
    ):
        cfg.write_text(text)
        with pytest.raises(HandposeError) as err:
            read_yolo(cfg)
        assert message in str(err.value), text


def test_read_source_options(tmp_path: Path, synth_root: Path) -> None:
    for kwargs, match in (
        ({"fmt": "voc"}, "--format 'voc'"),
        ({"fmt": "yolo", "versions": "all"}, "--versions is only for --format freihand"),
        ({"fmt": "yolo", "images": tmp_path}, "--images is only for --format coco"),
        ({"fmt": "freihand", "images": tmp_path}, "--images is only for --format coco"),
    ):
        with pytest.raises(HandposeError, match=match):
            read_source(synth_root, **kwargs)
    with pytest.raises(HandposeError, match="not found"):
        read_source(tmp_path / "nope", "yolo")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(HandposeError, match="a dataset folder or a dataset yaml"):
        read_source(tmp_path / "x.txt", "yolo")
