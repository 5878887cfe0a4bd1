"""The training recipe's options against independent references: class weights and OHEM
(torch's weighted cross-entropy, mmseg's OHEM rule), parameter groups, the photometric
distortion, a user's model factory (a torchvision model), EMA and fp16 runs that resume."""

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softprep.build import BuildOptions, build
from softprep.manifest import load_manifest
from softtrain.augment import hsv_to_rgb, photometric, rgb_to_hsv
from softtrain.checkpoint import load_checkpoint
from softtrain.config import FitConfig
from softtrain.evaluate import eval_checkpoint, model_from_checkpoint
from softtrain.fit import fit
from softtrain.losses import class_weights, soft_label_loss
from softtrain.models import build_model
from softtrain.optim import Stepper


def one_hot_batch(c=5, seed=0):
    """(index, prob) of one-hot top-K labels with some void, and their hard target."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (2, 12, 16), generator=g)
    target[:, :2] = 255
    index = torch.full((2, 3, 12, 16), 255, dtype=torch.uint8)
    index[:, 0] = target.to(torch.uint8)
    prob = torch.zeros_like(index)
    prob[:, 0] = 255
    return index, prob, target


def test_class_weights_and_ohem_equal_their_references():
    index, prob, target = one_hot_batch()
    logits = torch.randn(2, 5, 12, 16, generator=torch.Generator().manual_seed(1))
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    ours = soft_label_loss(logits, index, prob, class_weights=w).loss
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, weight=w, ignore_index=255))
    # OHEM, mmseg's rule: keep pixels with p(true) < max(thresh, the min_kept-th smallest)
    p_true = logits.softmax(1).gather(1, target.clamp_max(4)[:, None])[:, 0]
    valid = target != 255
    for thresh, min_kept in [(0.7, 10), (0.3, 40), (0.05, 1)]:
        ranked = p_true[valid].sort().values
        cut = max(float(ranked[min(min_kept * 2, ranked.numel() - 1)]), thresh)
        keep = valid & (p_true < cut)
        expected = F.cross_entropy(logits, torch.where(keep, target, 255), ignore_index=255)
        got = soft_label_loss(logits, index, prob, ohem=(thresh, min_kept))
        torch.testing.assert_close(got.loss, expected)
        assert got.kept == keep.sum()
    counts = np.array([100, 400, 0, 25, 100, 7])  # C + void
    sqrt = class_weights("inverse-sqrt", counts, 5)
    assert sqrt[2] == 0 and sqrt[3] == pytest.approx(4 * sqrt[1].item())  # 16x rarer
    assert sqrt[[0, 1, 3, 4]].mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 values, the store has 5 classes"):
        class_weights("1,2,3", counts, 5)


def test_parameter_groups_put_norms_biases_and_the_head_apart():
    model = build_model("deeplabv3plus_r18", 4)
    cfg = FitConfig.of(store="s.zarr", optimizer="adamw", head_lr=10, norm_decay=False,
                       weight_decay=0.05, lr=1e-3)  # fmt: skip
    groups = Stepper(model, cfg, torch.device("cpu")).optimizer.param_groups
    trunk = {id(p) for p in model.trunk.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= trunk or not ids & trunk  # a group is trunk or head, never both
        assert g["lr"] == pytest.approx(1e-3 * (1 if ids <= trunk else 10))
        assert g["weight_decay"] == (0.05 if all(p.ndim > 1 for p in g["params"]) else 0.0)
        assert all(p.ndim > 1 for p in g["params"]) or all(p.ndim <= 1 for p in g["params"])
    assert (
        sum(len(g["params"]) for g in groups) == len(list(model.parameters())) and len(groups) == 4
    )
    default = Stepper(model, FitConfig.of(store="s.zarr"), torch.device("cpu")).optimizer
    assert len(default.param_groups) == 1 and isinstance(default, torch.optim.SGD)


def test_photometric_distortion_is_seeded_and_its_hsv_is_colorsys():
    x = torch.rand(2, 3, 4, 5)
    hsv = rgb_to_hsv(x)
    ref = [colorsys.rgb_to_hsv(*x[1, :, 2, 3].tolist())]
    np.testing.assert_allclose(hsv[1, :, 2, 3].numpy(), ref[0], atol=1e-6)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-5, rtol=0)
    image = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    a = photometric(image, torch.Generator().manual_seed(3))
    b = photometric(image, torch.Generator().manual_seed(3))
    c = photometric(image, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 255 and a.shape == image.shape


def test_augmentation_draws_differ_by_seed_purpose_rank_and_micro_batch():
    """Ranks hold other images: their distortions must differ too; the labelled crops'
    distortion and the unlabelled crops' strong view must not share draws (with --seed 0
    both were seeded by the micro-batch number alone)."""
    from softtrain.augment import PHOTOMETRIC, STRONG_VIEW, draws
    from softtrain.config import FitConfig
    from softtrain.fit import _prepare

    def first(*key):
        return torch.rand(8, generator=draws(*key))

    base = first(0, PHOTOMETRIC, 0, 5)
    assert torch.equal(base, first(0, PHOTOMETRIC, 0, 5))  # a resume draws the same
    for other in [(1, PHOTOMETRIC, 0, 5), (0, STRONG_VIEW, 0, 5), (0, PHOTOMETRIC, 1, 5),
                  (0, PHOTOMETRIC, 0, 6)]:  # fmt: skip
        assert not torch.equal(base, first(*other)), other
    cfg = FitConfig.of(store="x", photometric=True)
    batch = {"image": torch.full((4, 3, 8, 8), 128, dtype=torch.uint8)}
    ranks = [_prepare(dict(batch), 0, cfg, torch.device("cpu"), r)["image"] for r in (0, 1, 0)]
    assert torch.equal(ranks[0], ranks[2]) and not torch.equal(ranks[0], ranks[1])


def lraspp(num_classes):
    """A user's model: torchvision's LR-ASPP (returns a dict, logits at stride 8)."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)


@pytest.mark.slow
def test_a_torchvision_model_trains_evaluates_and_predicts_and_options_resume(samples, tmp_path):
    from softtrain.predict import predict

    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.25,)))
    common = dict(store=url, crop="48x96", batch_size=2, workers=0, device="cpu", lr=0.01,
                  log_every=1)  # fmt: skip
    cfg = FitConfig.of(out=str(tmp_path / "tv"), model=f"{__name__}:lraspp", iters=2, **common)
    assert fit(cfg)["step"] == 2
    confusion, _ = eval_checkpoint(str(tmp_path / "tv/best.pt"), url, split="val", device="cpu")
    assert confusion.matrix.sum() > 0
    image = next((samples["cityscapes"] / "leftImg8bit/val").rglob("*.png"))
    (label,) = predict(str(tmp_path / "tv/last.pt"), [image], tmp_path / "pred", device="cpu")
    assert label.is_file()
    recipe = dict(model="deeplabv3plus_r18", optimizer="adamw", head_lr=5, norm_decay=False,
                  class_weights="inverse-sqrt", ohem_thresh=0.7, ohem_min_kept=50,
                  photometric=True, ema=0.9, **common)  # fmt: skip
    straight, broken = tmp_path / "a", tmp_path / "b"
    fit(FitConfig.of(out=str(straight), iters=4, **recipe))

    def interrupt(log):
        if log.step == 3:  # after last.pt was written at step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(FitConfig.of(out=str(broken), iters=4, save_every=2, **recipe), on_log=interrupt)
    fit(FitConfig.of(out=str(broken), iters=4, save_every=2, **recipe), resume=True)
    a, b = (load_checkpoint(p / "last.pt") for p in (straight, broken))
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0, msg=f"{key} {k}")
    assert "ema" in load_checkpoint(straight / "best.pt")
    with pytest.raises(Exception, match="cannot change optimizer"):
        fit(FitConfig.of(out=str(broken), iters=6, **(recipe | {"optimizer": "sgd"})), resume=True)


def test_an_ema_run_is_evaluated_and_predicted_with_the_weights_it_chose_best_by(samples, tmp_path):
    """best.pt is chosen by the EMA's mIoU: eval (and predict, export, which load the same
    way) must score those weights, not the raw model's."""
    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.25,)))
    cfg = FitConfig.of(out=str(tmp_path / "run"), model=f"{__name__}:lraspp", store=url,
                       crop="48x96", batch_size=2, workers=0, device="cpu", lr=0.05, iters=3,
                       eval_every=3, ema=0.5)  # fmt: skip
    assert fit(cfg)["step"] == 3
    ckpt = load_checkpoint(tmp_path / "run/best.pt")
    raw = ckpt["model"]
    assert any(not torch.equal(raw[k], ckpt["ema"][k]) for k in raw)  # they differ
    loaded = model_from_checkpoint(ckpt, "cpu").state_dict()
    assert all(torch.equal(loaded[k], ckpt["ema"][k]) for k in ckpt["ema"])
    confusion, _ = eval_checkpoint(str(tmp_path / "run/best.pt"), url, split="val", device="cpu")
    assert confusion.miou() == pytest.approx(ckpt["best_miou"], abs=1e-6)
