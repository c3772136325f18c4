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
    ModelConfig,
    PoseModel,
    ShallowUNet,
    SimCCPose,
    StridedEncoder,
    StridedPose,
    build_model,
    flip_test,
    fold_batchnorm,
    model_from_config,
    model_summary,
    normalized_input,
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
    "simcc": {
        "arch": "simcc",
        "width": 4,
        "depth": 1,
        "image_size": SIZE,
        "sigma": 1.5,
        "loss": "kl",
        "index_offset": 0.5,
        "simcc_k": 2.0,
    },
}
CLASSES = {"unet": ShallowUNet, "strided": StridedPose, "simcc": SimCCPose}


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
    shapes = {"unet": (cells, cells), "strided": (cells, cells), "simcc": (2 * 2 * SIZE,)}  # x, y bins
    assert out.shape == (3, NUM_JOINTS, *shapes[arch])
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


def test_a_config_dict_takes_the_declared_defaults_and_ignores_training_keys() -> None:
    """model_from_config reads MODEL_KEYS only; a key it lacks takes ModelConfig's declared
    default (the values old checkpoints meant are checkpoint.OLD_FILES', tested with predict)."""
    partial = {k: v for k, v in CONFIGS["unet"].items() if k not in ("arch", "sigma")}
    model = model_from_config({**partial, "lr": 0.1, "epochs": 3})
    assert isinstance(model, ShallowUNet) and model.sigma == ModelConfig().sigma == 3.0


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


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_batchnorm_keeps_the_function_and_removes_every_conv_bn_pair(arch: str) -> None:
    """What `load_model` and `load_detector` run on: the folded model answers as the trained one
    (to float rounding), with no BatchNorm left behind a conv; a model in training mode is refused."""
    detector = {"arch": arch, "width": 4, "depth": 1, "loss": "focal"}
    model = model_from_config(CONFIGS.get(arch, detector)).train()
    with torch.no_grad():
        model(torch.randn(8, 3, SIZE, SIZE) * 2 + 1)  # running statistics that are not 0 and 1
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    model.eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
        bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        fold_batchnorm(model)
        after = model(x)
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert left == bns if arch == "unet" else left < bns  # the tutorial's UNet has BN before its convs
    for seq in (m for m in model.modules() if isinstance(m, torch.nn.Sequential)):
        pairs = zip(list(seq)[:-1], list(seq)[1:], strict=True)
        assert not any(
            isinstance(a, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d) for a, b in pairs
        )
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    assert (arch == "unet") == torch.equal(before, after)  # folded weights: new rounding, same function


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
    assert isinstance(model, CLASSES[arch])


# ----------------------------------------------------------------------------- simcc


def test_simcc_one_hot_target_decodes_to_its_own_coordinate() -> None:
    """A one-hot output in the bin that holds a coordinate decodes to within one bin of it."""
    model = _model("simcc")
    k, bins = 2.0, 2 * SIZE
    uv = torch.tensor([[0.2, 31.9], [13.3, 18.9], [16.0, 16.0], [5.74, 27.26]])  # input px
    logits = torch.full((1, len(uv), 2 * bins), -30.0)
    for j, (x, y) in enumerate(uv.tolist()):
        logits[0, j, int(x * k)] = 30.0
        logits[0, j, bins + int(y * k)] = 30.0
    pred, score = model.decode(logits)
    assert (pred[0] - uv).abs().max() <= 1 / k  # one bin
    assert torch.allclose(pred[0], (torch.floor(uv * k) + 0.5) / k, atol=1e-5)  # the bin's centre
    assert torch.allclose(score, torch.ones_like(score), atol=1e-5)


def test_simcc_decodes_gaussian_logits_between_bins_and_scores_a_flat_output_low() -> None:
    """The label's own log-probabilities (the loss's optimum) decode to the sub-bin coordinate;
    a flat output scores about (its window / bins)^2."""
    model = _model("simcc")
    assert isinstance(model, SimCCPose)
    uv = torch.tensor([[[13.37, 18.91], [7.03, 22.5]]])
    centres = (torch.arange(model.bins) + 0.5) / model.k
    logq = -0.5 * ((centres - uv[..., None]) / model.sigma) ** 2  # (1, 2, 2, bins)
    pred, score = model.decode(logq.reshape(1, 2, -1))
    assert torch.allclose(pred, uv, atol=0.01) and (score > 0.99).all()
    assert float(model.keypoint_loss(logq.reshape(1, 2, -1), uv, torch.ones(1, 2, dtype=torch.bool))) < 1e-5
    nearly_flat = torch.zeros(1, 1, 2, model.bins)
    nearly_flat[..., model.bins // 2] = 1e-6  # the argmax, away from the ends (which clip the window)
    _, flat = model.decode(nearly_flat.reshape(1, 1, -1))
    window = 2 * model.window + 1
    assert math.isclose(float(flat), (window / model.bins) ** 2, rel_tol=1e-4)


def test_simcc_loss_is_the_kl_divergence_from_the_label() -> None:
    model = _model("simcc")
    assert isinstance(model, SimCCPose)
    uv, visible = _targets(2)
    out = torch.randn(2, NUM_JOINTS, 2 * model.bins)
    centres = (torch.arange(model.bins) + 0.5) / model.k
    q = torch.softmax(-0.5 * ((centres - uv[..., None]) / model.sigma) ** 2, dim=-1)  # (B, J, 2, bins)
    logp = torch.log_softmax(out.reshape(2, NUM_JOINTS, 2, -1), dim=-1)
    kl = torch.nn.functional.kl_div(logp, q, reduction="none").sum(dim=(-1, -2))  # torch's own KL
    assert torch.allclose(model.loss(out, uv, visible), kl[visible].mean(), rtol=1e-5)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"loss": "l1"}, "loss 'l1'"),
        ({"simcc_k": 0.3}, "simcc_k"),  # 32 x 0.3 bins: not whole
        ({"simcc_k": -1.0}, "simcc_k"),
        ({"image_size": 40}, "image_size 40.*16"),
        ({"index_offset": 0.0}, "index_offset"),
        ({"presence_weight": -1.0}, "presence_weight"),
    ],
)
def test_bad_simcc_config_names_the_field(changes: dict, needle: str) -> None:
    with pytest.raises(HandposeError, match=needle):
        model_from_config({**CONFIGS["simcc"], **changes})


def test_strided_heads_share_one_encoder_and_keep_their_keys() -> None:
    """strided and simcc build on the same StridedEncoder, whose layers stay at the top level of
    the state_dict (where strided checkpoints have always had them)."""
    encoder = set(StridedEncoder(4, 1).state_dict())
    strided, simcc = _model("strided").state_dict(), _model("simcc").state_dict()
    assert encoder <= set(strided) & set(simcc)
    assert set(strided) - encoder == {k for k in strided if k.startswith("head.")}
    assert all(not k.startswith(("encoder.", "presence")) for k in strided)
    assert all(strided[k].shape == simcc[k].shape for k in encoder)


# ----------------------------------------------------------------------------- presence


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_presence_head_forward_decode_and_loss(arch: str) -> None:
    model = _model(arch, presence=True, presence_weight=0.5).train()
    plain = _model(arch)
    assert set(model.state_dict()) - set(plain.state_dict()) == {
        "presence_head.fc.weight",
        "presence_head.fc.bias",
    }
    uv, visible = _targets(4)
    out = model(torch.randn(4, 3, SIZE, SIZE))
    keypoints, logits = PoseModel.split(out)
    assert logits is not None and logits.shape == (4,)
    prob = model.presence(out)
    assert prob is not None and torch.allclose(prob, torch.sigmoid(logits))
    assert plain.presence(plain(torch.randn(1, 3, SIZE, SIZE))) is None
    present = torch.tensor([True, False, True, False])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, present.float())
    expected = model.keypoint_loss(keypoints, uv, visible & present[:, None]) + 0.5 * bce
    assert torch.allclose(model.loss(out, uv, visible, present), expected, rtol=1e-6)
    # without `present` every crop shows its hand
    everyone = (
        model.keypoint_loss(keypoints, uv, visible) + 0.5 * torch.nn.functional.softplus(-logits).mean()
    )
    assert torch.allclose(model.loss(out, uv, visible), everyone, rtol=1e-5)
    model.loss(out, uv, visible, present).backward()
    assert model.presence_head is not None and model.presence_head.fc.weight.grad is not None


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_targets_are_the_batch_keys_the_loss_takes(arch: str) -> None:
    """The trainer's one rule, loss(out, *(batch[k] for k in targets)): uv and visible, and present
    with a presence head, where the batch's negatives then add only to the presence term."""
    plain, model = _model(arch), _model(arch, presence=True)
    assert plain.targets == ("uv", "visible") and model.targets == ("uv", "visible", "present")
    uv, visible = _targets(4)
    batch = {"uv": uv, "visible": visible, "present": torch.tensor([True, False, True, True])}
    out = model(torch.randn(4, 3, SIZE, SIZE))
    by_rule = model.loss(out, *(batch[k] for k in model.targets))
    assert torch.equal(by_rule, model.loss(out, uv, visible, batch["present"]))
    assert not torch.equal(by_rule, model.loss(out, uv, visible))  # present reached the loss
    out = plain(torch.randn(4, 3, SIZE, SIZE))
    assert torch.equal(plain.loss(out, *(batch[k] for k in plain.targets)), plain.loss(out, uv, visible))


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_loss_ignores_keypoints_of_crops_without_a_hand(arch: str) -> None:
    """A negative crop's joints add nothing (even marked visible, even NaN); its presence does."""
    model = _model(arch, presence=True)
    uv, visible = _targets(4)
    present = torch.tensor([True, False, True, False])
    out = model(torch.randn(4, 3, SIZE, SIZE))
    keypoints, logits = PoseModel.split(out)
    keypoints, logits = keypoints.detach(), logits.detach()  # type: ignore[union-attr]

    def loss_and_grads(targets: torch.Tensor, vis: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k, g = keypoints.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        loss = model.loss((k, g), targets, vis, present)
        loss.backward()
        assert k.grad is not None and g.grad is not None
        return loss.detach(), k.grad, g.grad

    loss, grad, grad_logit = loss_and_grads(uv, visible)
    assert torch.equal(grad[~present], torch.zeros_like(grad[~present]))
    assert (grad_logit != 0).all()
    for moved in (uv + 5.0, torch.full_like(uv, float("nan"))):
        other = torch.where(present[:, None, None], uv, moved)
        everything = visible | ~present[:, None]  # negatives even claim visible joints
        again = loss_and_grads(other, everything)
        assert (
            torch.equal(loss, again[0]) and torch.equal(grad, again[1]) and torch.equal(grad_logit, again[2])
        )


@pytest.mark.parametrize("arch", ["strided", "simcc"])
def test_checkpoint_with_presence_round_trips(arch: str, tmp_path: Path) -> None:
    cfg = {**CONFIGS[arch], "presence": True, "presence_weight": 2.0}
    model = model_from_config(cfg).train()
    uv, visible = _targets(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.loss(
        model(torch.randn(4, 3, SIZE, SIZE)), uv, visible, torch.tensor([1, 0, 1, 0]).bool()
    ).backward()
    opt.step()
    torch.save({"config": cfg, "model": model.state_dict()}, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", map_location="cpu", weights_only=True)
    again = model_from_config(state["config"])
    again.load_state_dict(state["model"], strict=True)
    assert again.presence_weight == 2.0
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = model.eval()(x), again.eval()(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(model.presence(a), again.presence(b))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- flip test


@pytest.mark.parametrize("arch,presence", [("strided", True), ("simcc", False), ("unet", False)])
def test_flip_test_of_a_mirrored_photo_is_the_mirrored_prediction(arch: str, presence: bool) -> None:
    """A photo and its mirror, through the real preprocessing (PNG bytes, warp_to_input), the
    flip test and the inverse crop matrix: the mirror's keypoints are the photo's mirrored
    (x -> W - x, joints kept) to 1e-4 px, whatever the (random) weights."""
    import io

    import numpy as np
    from PIL import Image

    from handpose.geometry import apply_matrix, box_region, crop_matrix, image_region, invert
    from handpose.imageio import warp_to_input

    model = _model(arch, presence=presence).eval()
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    photo = np.asarray(Image.fromarray(small).resize((256, 192), Image.Resampling.BICUBIC))
    w = photo.shape[1]
    # crops at exactly 1/8 and 1/2 scale: the box-reduce before the warp then pairs the same pixels
    # in a photo and its mirror (at other scales its blocks start at the left edge of both)
    box = np.array([40.0, 30.0, 72.0, 60.0])
    mirrored_box = np.array([w - box[2], box[1], w - box[0], box[3]])
    answers, plain = [], []
    for image, region in (
        (photo, image_region(256, 192)),
        (photo[:, ::-1], image_region(256, 192)),
        (photo, box_region(box, 2.0)),
        (photo[:, ::-1], box_region(mirrored_box, 2.0)),
    ):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
        M = crop_matrix(region, SIZE)
        x = (
            torch.from_numpy(warp_to_input(buf.getvalue(), M, SIZE).copy()).permute(2, 0, 1)[None].float()
            / 255
        )
        uv, score, prob = flip_test(model, (x - 0.5) / 0.25)
        assert (prob is not None) == presence
        answers.append((apply_matrix(invert(M), uv[0].double().numpy()), score[0], prob))
        plain.append(
            apply_matrix(invert(M), model.decode(model((x - 0.5) / 0.25))[0][0].detach().double().numpy())
        )
    for (uv, score, prob), (uv_m, score_m, prob_m) in (answers[:2], answers[2:]):
        np.testing.assert_allclose(uv_m[:, 0], w - uv[:, 0], atol=1e-4)
        np.testing.assert_allclose(uv_m[:, 1], uv[:, 1], atol=1e-4)
        assert torch.allclose(score, score_m, atol=1e-6)
        if presence:
            assert torch.allclose(prob, prob_m, atol=1e-6)
    # the model alone is not symmetric: the flip test made it so
    assert np.abs(plain[1][:, 0] - (w - plain[0][:, 0])).max() > 1e-3
    # and it is not the plain prediction: the mirror's answer was averaged in
    assert not np.allclose(
        answers[0][0], apply_matrix(invert(crop_matrix(image_region(256, 192), SIZE)), 0 * answers[0][0])
    )


def test_model_table_measures_each_head(capsys: pytest.CaptureFixture[str]) -> None:
    """tools/model_table.py reads simcc (and presence) configurations; the bench measures them
    through the real loss and optimizer step."""
    import importlib.util
    import json

    from handpose.bench.model import bench_models

    path = Path(__file__).resolve().parents[1] / "tools" / "model_table.py"
    spec = importlib.util.spec_from_file_location("model_table", path)
    assert spec is not None and spec.loader is not None
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    configs = [table.parse(s) for s in ("strided-w4-d1@32", "simcc-w4-d1@32,simcc_k=3,presence=1")]
    assert configs[1] == {**CONFIGS["simcc"], "sigma": 2.0, "simcc_k": 3.0, "presence": True}
    rows = bench_models(configs, batch_size=2, threads=1, steps=1, rounds=1)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][1]["arch"] == "simcc"
    simcc = model_from_config(configs[1])
    assert rows[1]["params"] == sum(p.numel() for p in simcc.parameters())
    assert rows[1]["flops_per_sample"] > rows[0]["flops_per_sample"] > 0  # the bins' linear layers
    assert all(r["samples_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("size", [96, 224, 37])
def test_normalized_input_is_each_channels_mean_and_std_in_channels_last_memory(size: int) -> None:
    """predict's and the API's model input: (x - 255 mean) / (255 std) per RGB channel, NCHW in
    channels_last memory, the uint8 photos left untouched."""
    gen = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8, generator=gen)
    before = images.clone()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = normalized_input(images, mean, std, torch.device("cpu"))
    assert x.shape == (3, 3, size, size) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    for c in range(3):
        expected = (images[..., c].double() / 255.0 - mean[c]) / std[c]
        assert torch.allclose(x[:, c].double(), expected, atol=1e-5)
    assert torch.equal(images, before)
    assert torch.equal(normalized_input(images, mean, std, torch.device("cpu")), x)  # the cached rows
