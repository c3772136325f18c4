"""The hand detector: shapes, gradients, targets <-> decode, training steps, checkpoints, loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from handpose import checkpoint
from handpose.detector import (
    CenterNet,
    DetectorSpec,
    decode_output,
    detect,
    detect_photos,
    detection_targets,
    load_detector,
)
from handpose.errors import HandposeError
from handpose.geometry import fit_matrix, invert, move_boxes
from handpose.model import fold_batchnorm, model_from_config

CONFIG = {"arch": "centernet", "width": 4, "depth": 1, "image_size": 64, "sigma": 3.0, "loss": "focal"}


def _boxes(rng: np.random.Generator, b: int, k: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random boxes of 6-40 px inside a size x size input, about two thirds of the slots real."""
    corner = rng.uniform(0, size - 40, (b, k, 2))
    side = rng.uniform(6, 40, (b, k, 2))
    boxes = torch.tensor(np.concatenate([corner, corner + side], -1), dtype=torch.float32)
    return boxes, torch.tensor(rng.uniform(size=(b, k)) < 0.66)


def ideal_output(boxes: torch.Tensor, hands: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """The output a perfect detector would give, built from the target code's own targets."""
    h = w = size // stride
    t = detection_targets(boxes, hands, (h, w), stride)
    out = torch.zeros(len(boxes), 5, h * w)
    out[:, 0] = torch.logit(t.heat.clamp(1e-6, 1 - 1e-6)).flatten(1)
    for b in range(len(boxes)):
        idx = t.index[b][t.mask[b]]
        out[b, 1:3, idx] = t.size[b][t.mask[b]].T
        out[b, 3:5, idx] = t.offset[b][t.mask[b]].T
    return out.view(len(boxes), 5, h, w)


@pytest.mark.parametrize("stride", [4, 8])
def test_forward_backward_shapes(stride: int) -> None:
    net = model_from_config({**CONFIG, "stride": stride})
    assert isinstance(net, CenterNet)
    x = torch.randn(3, 3, 64, 64, requires_grad=True)
    out = net(x)
    assert out.shape == (3, 5, 64 // stride, 64 // stride)
    boxes, hands = _boxes(np.random.default_rng(0), 3, 4, 64)
    batch = {"boxes": boxes, "hands": hands}
    loss = net.loss(out, *(batch[k] for k in net.targets))  # the trainer's rule: its own targets
    assert net.targets == ("boxes", "hands") and torch.equal(loss, net.loss(out, boxes, hands))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("stride", [4, 8])
def test_decode_recovers_generated_boxes_from_the_targets(stride: int) -> None:
    """Every generated box comes back from the targets to 1e-3 px with score 1, best first, and
    nothing else scores as high."""
    rng = np.random.default_rng(stride)
    size = 128
    # boxes far enough apart that no two centres share a cell or a 3x3 neighbourhood
    for _ in range(5):
        b, k = 4, 3
        cells = np.stack([rng.choice(size // stride // 3, k, replace=False) for _ in range(b * 2)]).reshape(
            b, 2, k
        )
        centre = (cells.transpose(0, 2, 1) * 3 + 1 + rng.uniform(0, 1, (b, k, 2))) * stride
        side = rng.uniform(8, 60, (b, k, 2))
        boxes = torch.tensor(np.concatenate([centre - side / 2, centre + side / 2], -1), dtype=torch.float32)
        hands = torch.tensor(rng.uniform(size=(b, k)) < 0.7)
        found, scores = decode_output(ideal_output(boxes, hands, size, stride), stride, k)
        for i in range(b):
            n = int(hands[i].sum())
            assert torch.allclose(scores[i, :n], torch.ones(n), atol=1e-5)
            assert (scores[i, n:] < 0.99).all()
            want = boxes[i][hands[i]].numpy()
            got = found[i, :n].numpy()
            order = np.lexsort(got.T[::-1]), np.lexsort(want.T[::-1])
            np.testing.assert_allclose(got[order[0]], want[order[1]], atol=1e-3)


def test_targets_peak_at_the_centre_cell_and_ignore_padding() -> None:
    boxes = torch.tensor([[[8.0, 8.0, 40.0, 24.0], [1e9, -5.0, float("nan"), 0.0]]])
    hands = torch.tensor([[True, False]])
    t = detection_targets(boxes, hands, (8, 8), 8)
    assert t.heat[0, 2, 3] == 1.0  # centre (24, 16): cell row 2, column 3
    assert int((t.heat == 1).sum()) == 1 and torch.isfinite(t.heat).all()
    assert t.index[0, 0] == 2 * 8 + 3 and t.mask.tolist() == [[True, False]]
    np.testing.assert_allclose(t.size[0, 0].numpy(), np.log([4.0, 2.0]), atol=1e-6)
    np.testing.assert_allclose(t.offset[0, 0].numpy(), [0.0, 0.0], atol=1e-6)
    assert t.count.item() == 1


def test_a_batch_without_hands_trains_towards_no_hand() -> None:
    net = CenterNet(4, 1, stride=8)
    out = net(torch.randn(2, 3, 64, 64))
    loss = net.loss(out, torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() > 0 and net.head[-1].bias.grad[0] > 0  # pushes every cell's score down


def test_a_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    net = CenterNet(4, 1, stride=8)
    x = torch.randn(4, 3, 32, 32)
    boxes, hands = _boxes(np.random.default_rng(1), 4, 2, 64)
    boxes, hands = boxes / 2, hands  # inside 32 px
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = net.loss(net(x), boxes, hands)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _save(path: Path, net: torch.nn.Module, **config: object) -> None:
    checkpoint.save(
        path,
        {
            "model": net.state_dict(),
            "config": {**CONFIG, "stride": 8, "min_score": 0.25, **config},
            "norm": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
            "epoch": 1,
            "step": 3,
        },
    )


def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = CenterNet(4, 1, stride=8).eval()
    net(torch.randn(4, 3, 64, 64))  # touch nothing: eval mode keeps BN statistics
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    _save(tmp_path / "det.pt", net)
    loaded, spec = load_detector(tmp_path / "det.pt")
    assert spec == DetectorSpec(64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.25)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), loaded(x), atol=1e-5)  # BN folded on loading: float rounding
        net = fold_batchnorm(net)  # what load_detector runs: the same folding, bit for bit
        assert torch.equal(net(x), loaded(x))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    a, b = (
        detect(net, spec, images, min_score=0.0, max_hands=5),
        detect(loaded, spec, images, min_score=0.0, max_hands=5),
    )
    for (ba, sa), (bb, sb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ba, bb)
        np.testing.assert_array_equal(sa, sb)
        assert len(sa) == 5 and (np.diff(sa) <= 0).all()


def test_detect_applies_the_score_threshold_and_max_hands() -> None:
    net = CenterNet(4, 1, stride=8).eval()
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 20.0], [36.0, 30.0, 60.0, 62.0]]])
    ideal = ideal_output(boxes, torch.tensor([[True, True]]), 64, 8)
    net.forward = lambda x: ideal.expand(len(x), -1, -1, -1)  # type: ignore[method-assign]
    spec = DetectorSpec(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.5)
    images = np.zeros((1, 64, 64, 3), np.uint8)
    ((found, scores),) = detect(net, spec, images)
    assert len(found) == 2 and (scores > 0.99).all()
    ((found, scores),) = detect(net, spec, images, max_hands=1)
    assert len(found) == 1
    ((found, scores),) = detect(net, spec, images, min_score=1.01)
    assert found.shape == (0, 4) and scores.shape == (0,)


def test_detect_photos_maps_boxes_back_to_the_photo(tmp_path: Path) -> None:
    """A 200 x 100 photo is letterboxed into 64 px; the boxes come back in the photo's pixels."""
    import io

    from PIL import Image

    net = CenterNet(4, 1, stride=8).eval()
    in_input = torch.tensor([[[8.0, 20.0, 24.0, 36.0]]])
    ideal = ideal_output(in_input, torch.tensor([[True]]), 64, 8)
    net.forward = lambda x: ideal.expand(len(x), -1, -1, -1)  # type: ignore[method-assign]
    spec = DetectorSpec(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.5)
    buf = io.BytesIO()
    Image.new("RGB", (200, 100), (90, 120, 30)).save(buf, format="JPEG")
    ((found, scores),) = detect_photos(net, spec, [buf.getvalue()])
    want = move_boxes(invert(fit_matrix(200, 100, 64)), in_input[0].numpy().astype(np.float64))
    np.testing.assert_allclose(found, want, atol=1e-3)
    np.testing.assert_allclose(want[0], [25.0, 12.5, 75.0, 62.5], atol=1e-9)  # 200/64 px per input px
    assert detect_photos(net, spec, []) == []


def test_damaged_or_foreign_detector_files_are_one_line(tmp_path: Path) -> None:
    net = CenterNet(4, 1, stride=8)
    good = tmp_path / "det.pt"
    _save(good, net)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "damaged.pt"
    bad.write_bytes(bytes(data))
    for path, needle in [
        (bad, "damaged.pt"),
        (tmp_path / "missing.pt", "not found"),
        (tmp_path, "is not a file"),
    ]:
        with pytest.raises(HandposeError) as e:
            load_detector(path)
        assert needle in str(e.value) and "\n" not in str(e.value)
    pose = tmp_path / "pose.pt"
    checkpoint.save(
        pose,
        {
            "model": {},
            "config": {
                "arch": "strided",
                "width": 4,
                "depth": 1,
                "image_size": 64,
                "sigma": 4.0,
                "loss": "l1",
            },
            "norm": {"mean": [0.5] * 3, "std": [0.2] * 3},
            "epoch": 1,
            "step": 1,
        },
    )
    with pytest.raises(HandposeError, match="not a detector"):
        load_detector(pose)
    wrong = tmp_path / "wrong.pt"
    _save(wrong, net, width=8)  # the config says width 8, the weights are width 4
    with pytest.raises(HandposeError, match="do not fit its config") as e:
        load_detector(wrong)
    assert "\n" not in str(e.value)


def test_build_errors_name_the_field() -> None:
    with pytest.raises(HandposeError, match="stride: must be one of 4, 8"):
        model_from_config({**CONFIG, "stride": 16})
    with pytest.raises(HandposeError, match="multiple of 32"):
        model_from_config({**CONFIG, "image_size": 48})
    with pytest.raises(HandposeError, match="loss 'l1'"):
        model_from_config({**CONFIG, "loss": "l1"})


def test_a_detector_checkpoint_is_not_a_keypoint_model(tmp_path: Path) -> None:
    """checkpoint.load_model (predict's and export's loader) refuses a detector in one line naming
    the file; load_detector refusing a keypoint checkpoint is tested above."""
    from handpose.checkpoint import load_model

    path = tmp_path / "det.pt"
    _save(path, CenterNet(4, 1, stride=8))
    with pytest.raises(HandposeError, match="hand detector") as e:
        load_model(path, torch.device("cpu"))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
