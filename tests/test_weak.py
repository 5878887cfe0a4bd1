"""Weak supervision: the relaxations and cross-entropies against hand-computed values, the
pseudo-label solver, gradients where intended, weak stores (deterministic, only training
splits thinned, resumable, verified) and fit with each regime."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softprep.build import BuildOptions, build
from softprep.manifest import VOID, load_manifest
from softprep.store import SoftStore
from softprep.verify import verify
from softprep.weak_labels import WeakProtocol
from softtrain.config import FitConfig, WeakOptions
from softtrain.fit import fit
from softtrain.weak_losses import (
    affinities,
    potts,
    potts_pairs,
    solve_pseudo_labels,
    weak_loss,
    xent,
)
from tests.tinynet import TINY

CS = load_manifest("cityscapes")
YP = torch.tensor([[0.5, 0.5, 0.0]]).T[None]  # (1, C=3, 1) distributions
YQ = torch.tensor([[0.25, 0.25, 0.5]]).T[None]


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("bilinear", 1 - 0.25),  # y_p.y_q = 0.125 + 0.125
        ("quadratic", (0.0625 + 0.0625 + 0.25) / 2),
        ("normalised-quadratic", 1 - 0.25 / (math.sqrt(0.5) * math.sqrt(0.375))),
        ("collision-ce", -math.log(0.25)),
        ("collision-divergence", -math.log(0.25 / (math.sqrt(0.5) * math.sqrt(0.375)))),
        ("log-quadratic", -math.log(1 - 0.1875)),
    ],
)
def test_potts_relaxations_by_hand(kind, expected):
    assert potts_pairs(kind, YP, YQ).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("standard", -(0.5 * math.log(0.25) + 0.5 * math.log(0.25))),  # -sum y ln s
        ("reverse", -(0.25 * math.log(0.5) + 0.25 * math.log(0.5) + 0.5 * math.log(1e-8))),
        ("collision", -math.log(0.25)),  # -ln sum y s
    ],
)
def test_cross_entropies_by_hand(kind, expected):
    assert xent(YP, YQ, kind).item() == pytest.approx(expected, rel=1e-5)


def test_collision_ce_of_one_hot_equals_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 6)
    target = torch.randint(0, 5, (2, 4, 6))
    y = F.one_hot(target, 5).permute(0, 3, 1, 2).float()
    ce = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(xent(y, logits.softmax(1), "collision"), ce, rtol=1e-5, atol=1e-6)


def test_affinity_weights_and_neighbourhoods():
    image = torch.zeros(1, 3, 2, 3, dtype=torch.uint8)
    image[0, :, :, 2] = 3  # one colour step of 3 in each channel between columns 1 and 2
    right, down = affinities(image, sigma=3.0)
    assert right.shape == (1, 2, 2) and down.shape == (1, 1, 3)
    assert right[0, 0, 0] == 1 and right[0, 0, 1].item() == pytest.approx(math.exp(-27 / 18))
    assert len(affinities(image, 3.0, neighbours=8)) == 4
    y = torch.full((1, 2, 2, 3), 0.5)  # uniform: every bilinear pair term is 0.5
    assert potts(y, [right, down], "bilinear").item() == pytest.approx(
        0.5 * (right.sum() + down.sum()).item() / 6
    )


@pytest.mark.parametrize("lam,step_lr", [(10.0, 0.05), (100.0, 2.0)])
def test_solver_keeps_labelled_pixels_and_lowers_its_objective(lam, step_lr):
    """Also with a step far too large for the weights (the second case), which a fixed
    step overshoots: the solver takes back a step that raised the objective and halves it."""
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 6, 8)
    labelled = torch.zeros(1, 6, 8, dtype=torch.bool)
    labelled[:, :, :2] = True
    target = F.one_hot(torch.full((1, 6, 8), 2), 3).permute(0, 3, 1, 2).float()
    image = torch.full((1, 3, 6, 8), 100, dtype=torch.uint8)
    image[..., 5:] = 0  # a colour edge: the pair weights across it are ~0
    weights = affinities(image, 3.0)
    opts = WeakOptions("self-label", lam=lam, steps=50, step_lr=step_lr)

    def objective(y):
        s = logits.softmax(1)
        h = xent(y, s, opts.xent).mean()
        return (opts.eta * h + opts.lam * potts(y, weights, opts.potts)).item()

    start = torch.where(labelled[:, None], target, logits.softmax(1))
    y = solve_pseudo_labels(logits, target, labelled, weights, opts)
    assert torch.equal(y[:, :, :, :2], target[:, :, :, :2])
    assert objective(y) < objective(start)
    assert not y.requires_grad


@pytest.mark.parametrize("relaxation", ["collision-divergence", "collision-ce", "bilinear"])
def test_pseudo_labels_spread_from_the_labels_up_to_the_colour_edge(relaxation):
    """An undecided network (uniform s), a dark and a bright half, a few labelled columns
    at each end: the solved pseudo-labels take each end's class up to the colour edge."""
    h, w, edge = 4, 24, 8  # off the middle, where plain smoothing would meet
    image = torch.zeros(1, 3, h, w)
    image[..., edge:] = 100
    target = torch.zeros(1, 3, h, w)
    labelled = torch.zeros(1, h, w, dtype=torch.bool)
    labelled[..., :2], target[:, 0, :, :2] = True, 1
    labelled[..., -2:], target[:, 1, :, -2:] = True, 1
    opts = WeakOptions("self-label", potts=relaxation, steps=200, step_lr=0.075)
    y = solve_pseudo_labels(torch.zeros(1, 3, h, w), target, labelled, affinities(image, 3), opts)
    expected = torch.tensor([0] * edge + [1] * (w - edge)).expand(h, w)
    assert torch.equal(y.argmax(1)[0], expected)


def test_gradients_flow_only_where_intended(samples, tmp_path):
    url = str(tmp_path / "w.zarr")
    build(CS, samples["cityscapes"], url, BuildOptions(scales=(0.125,), weak="blocks:0.3:32"))
    from softtrain.data import CropDataset

    batch = next(
        iter(torch.utils.data.DataLoader(CropDataset(url, (32, 64), "train", seed=0), batch_size=2))
    )
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 32, 64, requires_grad=True)
    none = weak_loss(logits, batch["index"], batch["prob"], batch["image"], WeakOptions("none"))
    (grad,) = torch.autograd.grad(none.loss, logits)
    from softtrain.data import densify

    _, void = densify(batch["index"], batch["prob"], 19)
    unlabelled = void > 0.5
    assert unlabelled.any() and (~unlabelled).any()
    assert grad.abs().sum(1)[unlabelled].max() == 0  # labelled CE: unlabelled pixels get none
    for regime in ("potts", "self-label"):
        opts = WeakOptions(regime, steps=3)
        out = weak_loss(logits, batch["index"], batch["prob"], batch["image"], opts)
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert grad.abs().sum(1)[unlabelled].max() > 0, regime  # now they learn too


def test_weak_store_thins_training_splits_only_deterministically(samples, tmp_path):
    opts = BuildOptions(scales=(0.25,), weak="blocks:0.2:32", weak_seed=4)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    build(CS, samples["cityscapes"], a, opts)
    build(CS, samples["cityscapes"], b, opts, jobs=2)
    sa, sb = SoftStore(a), SoftStore(b)
    np.testing.assert_array_equal(sa.full_counts(), sb.full_counts())
    for i in range(len(sa)):
        np.testing.assert_array_equal(sa.read_soft(0.25, i)[0], sb.read_soft(0.25, i)[0])
    plain = str(tmp_path / "plain.zarr")
    build(CS, samples["cityscapes"], plain, BuildOptions(scales=(0.25,)))
    full, thin = SoftStore(plain).full_counts(), sa.full_counts()
    train = sa.split_of() == "train"
    np.testing.assert_array_equal(full[~train], thin[~train])  # evaluation keeps full labels
    labelled = 1 - thin[train, -1].sum() / thin[train].sum()
    assert 0.1 < labelled < 0.3  # ~20% of the blocks (less the dataset's own void)
    assert sa.describe()["weak"] == "blocks:0.2:32" and verify(sa).ok
    with pytest.raises(Exception, match="weak_seed"):
        build(CS, samples["cityscapes"], a, BuildOptions(scales=(0.25,), weak="blocks:0.2:32"))


def test_block_protocol_parsing_and_share():
    p = WeakProtocol.parse("blocks:0.1")
    assert (p.share, p.size) == (0.1, 64)
    label = np.zeros((640, 640), np.uint8)
    kept = (p.thin(label, 0, 3) != 255).mean()
    assert kept == pytest.approx(0.1)
    for bad in ("blocks", "blocks:2", "scribble:0.1", "blocks:x"):
        with pytest.raises(ValueError, match="weak protocol"):
            WeakProtocol.parse(bad)


@pytest.mark.parametrize("regime", ["potts", "self-label"])
def test_fit_with_each_regime(samples, tmp_path, regime):
    url = str(tmp_path / "w.zarr")
    build(CS, samples["cityscapes"], url, BuildOptions(scales=(0.125,), weak="blocks:0.3:32"))
    cfg = FitConfig.of(
        store=url, out=str(tmp_path / "run"), model=TINY, crop="32x64",
        batch_size=2, iters=3, workers=0, device="cpu", weak_loss=regime, weak_steps=5,
    )  # fmt: skip
    result = fit(cfg)
    assert result["step"] == 3 and result["last_miou"] is not None
    assert FitConfig.from_toml(tmp_path / "run/config.toml").weak.loss == regime


def test_scribbles_follow_the_skeletons_deterministically(samples):
    pytest.importorskip("skimage")
    from skimage.morphology import skeletonize

    from softprep.datasets import decode_label

    path = sorted((samples["cityscapes"] / "gtFine/train").rglob("*_labelIds.png"))[0]
    label = decode_label(path, CS)
    protocol = WeakProtocol.parse("scribbles:0.3:1")
    thin = protocol.thin(label, 0, 7)
    assert np.array_equal(thin, protocol.thin(label, 0, 7))  # seeded
    assert not np.array_equal(thin, protocol.thin(label, 0, 8))
    kept = thin != 255
    assert (thin[kept] == label[kept]).all()  # true labels, nowhere else
    skeleton_length = sum(skeletonize(label == c).sum() for c in np.unique(label) if c != 255)
    assert 0.3 * skeleton_length <= kept.sum() < 0.6 * skeleton_length  # whole strokes, width 1
    wide = WeakProtocol.parse("scribbles:0.3").thin(label, 0, 7)
    assert (wide != 255).sum() > kept.sum()  # drawn 3 px wide by default


def test_scribble_store_builds_and_verifies(samples, tmp_path):
    pytest.importorskip("skimage")
    url = str(tmp_path / "s.zarr")
    build(CS, samples["cityscapes"], url, BuildOptions(scales=(0.25,), weak="scribbles:0.2"))
    s = SoftStore(url)
    share = s.describe()["labelled_share"]
    assert share["train"] < 0.2 < share["val"] and verify(s).ok


def test_weak_term_starts_at_weak_start(samples, tmp_path):
    from softtrain.data import CropDataset
    from softtrain.losses import soft_label_loss
    from softtrain.weak_losses import training_loss

    url = str(tmp_path / "w.zarr")
    build(CS, samples["cityscapes"], url, BuildOptions(scales=(0.125,), weak="blocks:0.3:32"))
    batch = next(
        iter(torch.utils.data.DataLoader(CropDataset(url, (32, 64), "train", seed=0), batch_size=2))
    )
    logits = torch.randn(2, 19, 32, 64)
    cfg = FitConfig.of(store=url, weak_loss="potts", weak_start=5)
    loss = training_loss(cfg)
    plain = soft_label_loss(logits, batch["index"], batch["prob"]).loss
    assert loss(logits, batch["index"], batch["prob"], batch["image"], 4).loss == plain
    assert loss(logits, batch["index"], batch["prob"], batch["image"], 5).loss > plain


def test_missing_scikit_image_is_a_sentence_not_a_traceback(monkeypatch):
    import softprep.weak_labels as weak_labels

    monkeypatch.setattr(weak_labels, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs scikit-image: pip install 'softprep\[weak\]'"):
        BuildOptions(scales=(0.25,), weak="scribbles:0.2")


@pytest.mark.slow
def test_self_labelling_resumes_exactly_with_bf16_and_accumulation(samples, tmp_path):
    """The weak regime inside the one loop: bf16 autocast (the solver in float32), two
    micro-batches per step, interrupted after step 2 and resumed = one straight run."""
    url = str(tmp_path / "w.zarr")
    build(CS, samples["cityscapes"], url, BuildOptions(scales=(0.125,), weak="blocks:0.3:32"))

    def config(out, **kw):
        return FitConfig.of(
            store=url, out=str(out), model=TINY, crop="32x64", batch_size=2,
            accum=2, bf16=True, iters=3, workers=0, device="cpu", weak_loss="self-label",
            weak_steps=3, weak_start=1, log_every=1, **kw,
        )  # fmt: skip

    fit(config(tmp_path / "a"))

    def interrupt(log):
        if log.step == 3:  # after last.pt was written at step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config(tmp_path / "b", save_every=2), on_log=interrupt)
    fit(config(tmp_path / "b", save_every=2), resume=True)
    a, b = (torch.load(tmp_path / f"{r}/last.pt", weights_only=False)["model"] for r in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "spec,why",
    [
        ("blocks:0.5:1000000", "block side SIZE must be 1 to 8192 pixels"),
        ("blocks:0.5:0", "block side SIZE must be 1 to 8192"),
        ("scribbles:0.5:1000", "stroke WIDTH must be 1 to 255 pixels"),
        ("blocks:1.5", r"SHARE must be in \(0, 1\]"),
    ],
)
def test_weak_sizes_out_of_range_name_the_spec(spec, why):
    with pytest.raises(ValueError, match=f"weak protocol '{spec}': .*{why}"):
        WeakProtocol.parse(spec)


def test_blocks_and_strokes_equal_their_dense_definitions():
    from skimage.morphology import dilation, footprint_rectangle

    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (23, 37)).repeat(6, 0).repeat(5, 1).astype(np.uint8)
    for size in (1, 7, 64, 5000):  # 5000: one block larger than the image
        protocol = WeakProtocol.parse(f"blocks:0.3:{size}")
        keep = protocol.thin(label, 3, 1) != VOID
        rows, cols = -(-label.shape[0] // size), -(-label.shape[1] // size)
        r = np.random.default_rng([3, 1])
        kept = np.zeros(rows * cols, bool)
        kept[r.permutation(rows * cols)[: max(1, round(0.3 * rows * cols))]] = True
        dense = np.kron(kept.reshape(rows, cols), np.ones((size, size), bool))
        assert np.array_equal(keep, dense[: label.shape[0], : label.shape[1]]), size
    lines = rng.random(label.shape) > 0.97
    for width in (1, 4, 9):
        full = dilation(lines, footprint_rectangle((width, width)))
        separable = dilation(lines, footprint_rectangle((width, width), decomposition="separable"))
        assert np.array_equal(full, separable), width


def test_self_labelling_adds_nothing_on_the_labelled_pixels():
    """Eq. (8) of the paper: H(y, s) is over the unlabelled points; the labelled ones have
    their CE only. Logits changed at labelled pixels alone change the self-labelling loss
    exactly as much as the labelled CE (their pseudo-labels are the labels, fixed)."""
    torch.manual_seed(0)
    b, c, h, w = 2, 4, 12, 14
    image = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8)
    index = torch.full((b, 1, h, w), VOID, dtype=torch.uint8)
    index[:, 0, 3:5, 2:9], index[:, 0, 8, 4:12] = 1, 2
    prob = torch.full_like(index, 255)
    logits = torch.randn(b, c, h, w)
    changed = logits + 3 * torch.randn(b, c, h, w) * (index != VOID)
    opts = WeakOptions("self-label", steps=5)
    losses = {
        kind: [weak_loss(z, index, prob, image, WeakOptions(kind, steps=5)).loss
               for z in (logits, changed)]
        for kind in ("none", "self-label")
    }  # fmt: skip
    assert opts.eta > 0 and not torch.isclose(*losses["none"])
    torch.testing.assert_close(
        losses["self-label"][1] - losses["self-label"][0], losses["none"][1] - losses["none"][0]
    )


@pytest.mark.parametrize("kind", ["potts", "self-label"])
def test_weak_losses_leave_the_padding_of_a_crop_out(kind):
    """A crop larger than its image: the weak loss of the padded crop (padding void, black,
    any logits) equals the loss of the image alone, pairs, H term and averages included."""
    torch.manual_seed(0)
    b, c, h, w, ph, pw = 2, 4, 12, 14, 18, 20
    image = torch.randint(1, 256, (b, 3, h, w), dtype=torch.uint8)
    index = torch.full((b, 1, h, w), VOID, dtype=torch.uint8)
    index[:, 0, 3:5, 2:9] = 1  # a scribble of class 1, one of class 2
    index[:, 0, 8, 4:12] = 2
    prob = torch.full_like(index, 255)
    logits = torch.randn(b, c, h, w)
    padded = [torch.zeros(b, 3, ph, pw, dtype=torch.uint8), torch.full((b, 1, ph, pw), VOID,
              dtype=torch.uint8), torch.full((b, 1, ph, pw), 255, dtype=torch.uint8),
              3 * torch.randn(b, c, ph, pw)]  # fmt: skip
    for big, small in zip(padded, (image, index, prob, logits)):
        big[..., :h, :w] = small
    valid = torch.zeros(b, ph, pw, dtype=torch.bool)
    valid[:, :h, :w] = True
    opts = WeakOptions(kind, steps=20)
    alone = weak_loss(logits, index, prob, image, opts)
    inside = weak_loss(padded[3], padded[1], padded[2], padded[0], opts, valid=valid)
    torch.testing.assert_close(inside.loss, alone.loss, rtol=1e-4, atol=1e-6)
