"""The architectures behind `build_model`: shapes, decoders, losses, checkpoints, learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from handpose.errors import HandposeError
from handpose.heatmaps import keypoints_to_heatmaps
from handpose.model import (
    ARCHS,
    DETECTORS,
    MODEL_KEYS,
    PoseModel,
    ShallowUNet,
    StridedPose,
    build_model,
    model_from_config,
    model_summary,
)
from handpose.skeleton import NUM_JOINTS

KEYPOINT_ARCHS = [a for a in ARCHS if a not in DETECTORS]  # the detector: tests/test_detector.py

SIZE = 32  # input side of the tiny test models: a multiple of every arch's downsampling
CONFIGS = {
    "unet": {
        "arch": "unet",
        "width": 4,
        "depth": 2,
        "image_size": SIZE,
        "sigma": 2.0,
        "loss": "iou",
        "index_offset": 0.5,
    },
    "strided": {
        "arch": "strided",
        "width": 4,
        "depth": 1,
        "image_size": SIZE,
        "sigma": 3.0,
        "loss": "l1",
        "index_offset": 0.5,
        "reg": 1.0,
    },
}


def _model(arch: str, **changes: object) -> PoseModel:
    torch.manual_seed(0)
    return model_from_config({**CONFIGS[arch], **changes})


def _targets(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints inside the frame, about a quarter of them invisible."""
    g = torch.Generator().manual_seed(seed)
    uv = 2 + torch.rand(batch, NUM_JOINTS, 2, generator=g) * (SIZE - 4)
    visible = torch.rand(batch, NUM_JOINTS, generator=g) > 0.25
    return uv, visible


def _dots(uv: torch.Tensor) -> torch.Tensor:
    """Images with one coloured blob per joint (a fixed colour per joint): a learnable toy task."""
    colours = torch.rand(NUM_JOINTS, 3, generator=torch.Generator().manual_seed(7)) * 2 - 1
    maps = keypoints_to_heatmaps(uv, torch.ones(uv.shape[:2], dtype=torch.bool), SIZE, sigma=1.5)
    return torch.einsum("bjhw,jc->bchw", maps, colours)


# ----------------------------------------------------------------------------- forward, backward


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_forward_backward_shapes_and_finite_grads(arch: str) -> None:
    model = _model(arch).train()
    uv, visible = _targets(3)
    out = model(torch.randn(3, 3, SIZE, SIZE))
    cells = SIZE if arch == "unet" else SIZE // 4
    assert out.shape == (3, NUM_JOINTS, cells, cells)
    loss = model.loss(out, uv, visible)
    assert loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    pred, score = model.decode(out.detach())
    assert pred.shape == (3, NUM_JOINTS, 2) and score.shape == (3, NUM_JOINTS)
    assert ((pred >= 0) & (pred <= SIZE)).all()
    assert ((score >= 0) & (score <= 1)).all()


def test_unet_keeps_the_tutorial_layout() -> None:
    model = build_model("unet", width=16, depth=3, image_size=128, sigma=3.0, loss="iou", index_offset=0.0)
    assert isinstance(model, ShallowUNet)
    assert len(model.state_dict()) == 85  # the tutorial's model_final keys (loaded strict in test_train)
    assert sum(p.numel() for p in model.parameters()) == 491_206


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"arch": "resnet"}, "arch"),
        ({"loss": "l1"}, "loss 'l1'"),
        ({"image_size": 34}, "image_size 34"),
        ({"width": 0}, "width"),
        ({"sigma": 0.0}, "sigma"),
    ],
)
def test_bad_unet_config_names_the_field(changes: dict, needle: str) -> None:
    with pytest.raises(HandposeError, match=needle):
        model_from_config({**CONFIGS["unet"], **changes})


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"loss": "iou"}, "loss 'iou'"),
        ({"image_size": 40}, "image_size 40.*16"),
        ({"index_offset": 0.0}, "index_offset"),
        ({"reg": -1.0}, "reg"),
    ],
)
def test_bad_strided_config_names_the_field(changes: dict, needle: str) -> None:
    with pytest.raises(HandposeError, match=needle):
        model_from_config({**CONFIGS["strided"], **changes})


def test_config_without_arch_is_a_unet_and_missing_keys_are_named() -> None:
    old = {k: v for k, v in CONFIGS["unet"].items() if k != "arch"}
    assert isinstance(model_from_config({**old, "lr": 0.1, "epochs": 3}), ShallowUNet)
    with pytest.raises(HandposeError, match="'sigma'"):
        model_from_config({k: v for k, v in old.items() if k != "sigma"})


# ----------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("offset", [0.5, 0.0])
def test_unet_decodes_a_gaussian_heatmap_to_its_centre(offset: float) -> None:
    model = _model("unet", index_offset=offset)
    uv = torch.tensor([[[10.3, 20.7], [16.0, 9.25]]])  # sub-pixel, > 4 sigma from the border
    maps = keypoints_to_heatmaps(uv, torch.ones(1, 2, dtype=torch.bool), SIZE, sigma=2.0)
    pred, score = model.decode(maps)
    # index_offset 0 (the tutorial's decoder) reads cell i as i: half a pixel up-left.
    assert torch.allclose(pred, uv - (0.5 - offset), atol=1e-3)
    assert torch.allclose(score, torch.ones(1, 2), atol=0.05)  # the peak of the map


def test_strided_decodes_hand_built_logits() -> None:
    model = _model("strided")
    cells = SIZE // 4
    logits = torch.full((1, 3, cells, cells), -30.0)
    logits[0, 0, 2, 5] = 30.0  # one sharp cell: its centre, ((5 + .5) * 4, (2 + .5) * 4)
    logits[0, 1, 4, 1:3] = 30.0  # two equal cells side by side: exactly between their centres
    logits[0, 2] = 0.0  # flat: the image centre, low confidence
    pred, score = model.decode(logits)
    assert torch.allclose(pred[0], torch.tensor([[22.0, 10.0], [8.0, 18.0], [16.0, 16.0]]), atol=1e-4)
    assert torch.allclose(score[0, :2], torch.ones(2), atol=1e-5)
    assert math.isclose(float(score[0, 2]), 9 / cells**2, rel_tol=1e-5)


def test_strided_decodes_a_gaussian_at_a_sub_pixel_point() -> None:
    model = _model("strided")
    cells = SIZE // 4
    centres = (torch.arange(cells) + 0.5) * 4
    target = torch.tensor([13.3, 18.9])  # input px, between cell centres on both axes
    logits = -0.5 * (((centres[None, :] - target[0]) ** 2 + (centres[:, None] - target[1]) ** 2) / 4.0**2)
    pred, _ = model.decode(logits[None, None])
    assert torch.allclose(pred[0, 0], target, atol=0.05)  # a sampled Gaussian's mean, not the bias of a peak


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_loss_ignores_invisible_joints(arch: str) -> None:
    model = _model(arch)
    uv, visible = _targets(4)
    out = model(torch.randn(4, 3, SIZE, SIZE)).detach()

    def loss_and_grad(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = out.clone().requires_grad_(True)
        loss = model.loss(o, targets, visible)
        loss.backward()
        assert o.grad is not None
        return loss.detach(), o.grad

    loss, grad = loss_and_grad(uv)
    assert torch.equal(grad[~visible], torch.zeros_like(grad[~visible]))  # their output maps add nothing
    for moved in (uv + 7.0, torch.full_like(uv, float("nan"))):  # unlabelled joints may hold NaN
        other = torch.where(visible[..., None], uv, moved)
        loss2, grad2 = loss_and_grad(other)
        assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    # and the visible joints do count
    assert not torch.equal(loss, loss_and_grad(torch.where(visible[..., None], uv + 3.0, uv))[0])


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_batch_without_visible_joints_gives_zero_loss_that_backpropagates(arch: str) -> None:
    model = _model(arch)
    uv, _ = _targets(2)
    loss = model.loss(model(torch.randn(2, 3, SIZE, SIZE)), uv, torch.zeros(2, NUM_JOINTS, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_loss_is_fp32_under_autocast(arch: str) -> None:
    model = _model(arch).eval()
    uv, visible = _targets(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, SIZE, SIZE))
        loss = model.loss(out, uv, visible)
        pred, score = model.decode(out)
    assert out.dtype == torch.bfloat16  # the forward did run in bf16
    assert loss.dtype == pred.dtype == score.dtype == torch.float32
    # the same numbers as the loss of the (bf16) output computed outside autocast
    assert torch.allclose(loss, model.loss(out.float(), uv, visible), rtol=1e-6, atol=1e-7)


def test_unet_mse_averages_visible_maps_only() -> None:
    model = _model("unet", loss="mse")
    uv, visible = _targets(2)
    out = torch.rand(2, NUM_JOINTS, SIZE, SIZE)
    target = keypoints_to_heatmaps(uv, visible, SIZE, sigma=2.0)
    expected = (out - target).square().mean(dim=(2, 3))[visible].mean()
    assert torch.allclose(model.loss(out, uv, visible), expected, rtol=1e-6)


def test_strided_loss_is_l1_in_units_of_the_side_plus_js() -> None:
    l1_only = _model("strided", reg=0.0)
    uv, visible = _targets(2)
    out = torch.randn(2, NUM_JOINTS, SIZE // 4, SIZE // 4)
    pred, _ = l1_only.decode(out)
    expected = ((pred - uv).abs().sum(-1) / SIZE)[visible].mean()
    assert torch.allclose(l1_only.loss(out, uv, visible), expected, rtol=1e-6)
    # the regulariser is a divergence: >= 0, and at most ln 2 per joint
    js = _model("strided", reg=1.0).loss(out, uv, visible) - expected
    assert 0 < float(js) <= math.log(2)


# ----------------------------------------------------------------------------- checkpoints, summary


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_checkpoint_round_trip(arch: str, tmp_path: Path) -> None:
    cfg = {**CONFIGS[arch], "lr": 0.01}  # a training config also holds keys that are not the model's
    model = model_from_config(cfg).train()
    uv, visible = _targets(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.loss(model(torch.randn(4, 3, SIZE, SIZE)), uv, visible).backward()  # weights and BN stats move
    opt.step()
    torch.save({"config": cfg, "model": model.state_dict()}, tmp_path / "c.pt")

    state = torch.load(tmp_path / "c.pt", map_location="cpu", weights_only=True)
    again = model_from_config(state["config"])
    again.load_state_dict(state["model"], strict=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))
    assert set(MODEL_KEYS) >= {k for k in cfg if k != "lr"}


def test_model_summary_counts_and_leaves_the_model_alone() -> None:
    model = _model("strided").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, big = model_summary(model, SIZE), model_summary(model, 2 * SIZE)
    assert small["params"] == sum(p.numel() for p in model.parameters())
    # a fully convolutional model: FLOPs scale with the pixels
    assert big["flops_per_sample"] == 4 * small["flops_per_sample"] > 0
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_a_few_steps_lower_the_loss_on_a_fixed_problem(arch: str) -> None:
    model = _model(arch).train()
    uv, visible = _targets(8, seed=3)
    images = _dots(uv)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.loss(model(images), uv, visible)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.8 * losses[0], losses
    assert isinstance(model, ShallowUNet if arch == "unet" else StridedPose)
