"""Readers: FreiHAND root and COCO keypoints json -> validated records, every problem named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from handpose.errors import HandposeError
from handpose.freihand import (
    check_coco_keypoints,
    check_K,
    check_xyz,
    parse_versions,
    read_coco,
    read_freihand,
)
from handpose.geometry import project_points
from handpose.shards import EVAL_SID_OFFSET

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
    assert all(r.sid >= EVAL_SID_OFFSET and r.file.startswith("evaluation/rgb/") for r in evals)


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
    kp = [v for j in range(21) for v in (j, 2 * j, 1)]
    np.testing.assert_array_equal(check_coco_keypoints(kp), np.array([[j, 2 * j] for j in range(21)]))
    with pytest.raises(ValueError, match="keypoint 3 is not labelled"):
        check_coco_keypoints(kp[:11] + [0] + kp[12:])
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
        r = by_sid[ann["image_id"]]
        assert r.id == r.sid and r.xyz is None and r.K is None and r.size == (224, 224)
        assert r.file == f"{ann['image_id']:08d}.jpg" and r.path.is_file()
        np.testing.assert_array_equal(r.uv, np.array(ann["keypoints"]).reshape(21, 3)[:, :2])
    assert data.ids == sorted(by_sid)


def test_read_coco_problems(tmp_path: Path, synth_root: Path) -> None:
    for i in range(4):
        shutil.copy(synth_root / f"training/rgb/{i:08d}.jpg", tmp_path / f"{i}.jpg")
    kp = [v for j in range(21) for v in (10.0 + j, 20.0 + j, 2)]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 224, "height": 224} for i in range(6)]
    anns = [
        {"image_id": 0, "keypoints": kp},
        {"image_id": 1, "keypoints": kp[:-3]},  # 20 keypoints
        {"image_id": 2, "keypoints": kp},
        {"image_id": 2, "keypoints": kp},  # two hands
        {"image_id": 4, "keypoints": kp},  # no such file
        {"image_id": 99, "keypoints": kp},  # no such image entry
    ]  # image 3 and 5 have no annotation
    (tmp_path / "kp.json").write_text(json.dumps({"images": images, "annotations": anns}))
    data = read_coco(tmp_path / "kp.json")
    assert [r.sid for r in data.records] == [0]
    reasons = {p.id: p.reason for p in data.problems}
    assert set(reasons) == {1, 2, 4}
    assert "shape" in reasons[1] and "2 annotations" in reasons[2] and reasons[4] == "missing image"
    assert any("2 images have no annotation" in n for n in data.notes)
    assert any("1 annotations refer to no listed image" in n for n in data.notes)


def test_read_coco_bad_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(HandposeError, match="not a COCO json"):
        read_coco(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "x"}] * 2, "annotations": []})
    )
    with pytest.raises(HandposeError, match="image id 1 appears twice"):
        read_coco(tmp_path / "b.json")
    with pytest.raises(HandposeError, match="file not found"):
        read_coco(tmp_path / "missing.json")
