"""Semi-supervised training: EMA exactness, partitions, dynamic soft labels by hand, the
inter-pixel loss against a dense reference, and an exact resume of a teacher-student run."""

from contextlib import ExitStack

import numpy as np
import pytest
import torch

from softprep.build import BuildOptions, build
from softprep.manifest import load_manifest
from softprep.sample import write_sample
from softprep.store import SoftStore
from softtrain.checkpoint import load_checkpoint
from softtrain.config import FitConfig
from softtrain.data import valid_mask
from softtrain.distributed import Ranks
from softtrain.evaluate import model_from_checkpoint
from softtrain.fit import TrainingError, _prepare, fit, open_inputs
from softtrain.regime import ema_update
from softtrain.semi import dynamic_soft_labels, partition, relation_loss
from tests.tinynet import TINY


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("semi") / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.125,)))
    return url


def test_ema_update_is_exact():
    torch.manual_seed(0)
    teacher, student = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in (teacher, student):
        torch.nn.init.normal_(module.weight)
        module.running_mean.normal_()
    student.num_batches_tracked += 7
    t0 = [p.clone() for p in teacher.parameters()] + [teacher.running_mean.clone()]
    s0 = [p.clone() for p in student.parameters()] + [student.running_mean.clone()]
    ema_update(teacher, student, 0.9)
    after = list(teacher.parameters()) + [teacher.running_mean]
    for t, a, s in zip(after, t0, s0):
        assert torch.equal(t, a * 0.9 + s * (1 - 0.9))
    assert teacher.num_batches_tracked == 7  # integer buffers are copied


def test_partitions_are_deterministic_disjoint_and_from_lists(store, tmp_path):
    s = SoftStore(store)
    items = np.flatnonzero(s.split_of() == "train")
    labelled, rest = partition(s.names(), items, "1/2", 0)
    again, _ = partition(s.names(), items, "1/2", 0)
    assert np.array_equal(labelled, again) and len(labelled) == 2
    assert not set(labelled) & set(rest) and sorted([*labelled, *rest]) == sorted(items)
    names = [str(n).rsplit("/", 1)[-1] for n in s.names()[items[:2]]]
    listing = tmp_path / "partition.txt"  # the usual format: image path, label path
    listing.write_text(
        "".join(f"leftImg8bit/train/x/{n}_leftImg8bit.png gtFine/x/{n}.png\n" for n in names)
    )
    chosen, _ = partition(s.names(), items, str(listing), 0, "_leftImg8bit.png")
    assert list(chosen) == list(items[:2])
    listing.write_text("leftImg8bit/train/x/nowhere_000000_000000_leftImg8bit.png\n")
    with pytest.raises(ValueError, match="match no training image"):
        partition(s.names(), items, str(listing), 0)


def test_dynamic_soft_labels_by_hand():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).view(1, 4, 1, 1)
    expected = torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8  # top classes until 0.7 is reached
    torch.testing.assert_close(dynamic_soft_labels(probs, 0.7).flatten(), expected)
    torch.testing.assert_close(
        dynamic_soft_labels(probs, 0.4).flatten(), torch.tensor([1.0, 0, 0, 0])
    )
    shuffled = probs[:, [2, 0, 3, 1]]  # class order does not matter
    torch.testing.assert_close(dynamic_soft_labels(shuffled, 0.7).flatten(), expected[[2, 0, 3, 1]])


def dense_relation_reference(student, teacher, kind):
    s, t = student.double().numpy(), teacher.double().numpy()
    n = len(s)
    rs = np.array([[s[i] @ s[j] for j in range(n)] for i in range(n)])
    rt = np.array([[t[i] @ t[j] for j in range(n)] for i in range(n)])
    if kind == "kl":
        ps, pt = rs / rs.sum(1, keepdims=True), rt / rt.sum(1, keepdims=True)
        return float(np.mean([(pt[i] * np.log(pt[i] / ps[i])).sum() for i in range(n)]))
    return float(np.mean([1 - np.corrcoef(rs[i], rt[i])[0, 1] for i in range(n)]))


@pytest.mark.parametrize("kind", ["kl", "corr"])
def test_inter_pixel_loss(kind):
    torch.manual_seed(2)
    student = torch.randn(7, 5).softmax(1)
    teacher = torch.randn(7, 5).softmax(1)
    assert relation_loss(student, student, kind).item() == pytest.approx(0, abs=1e-6)
    ours = relation_loss(student, teacher, kind).item()
    assert ours == pytest.approx(dense_relation_reference(student, teacher, kind), rel=1e-4)


def semi_config(store, out, **kw):
    return FitConfig.of(
        store=store, out=str(out), model=TINY, crop=kw.pop("crop", "32x64"),
        batch_size=kw.pop("batch_size", 1), unlabeled_batch=kw.pop("unlabeled_batch", 2), iters=kw.pop("iters", 4), lr=0.02, workers=0, device="cpu",
        log_every=1, labeled=kw.pop("labeled", "1/2"), semi_esl=True, semi_ipix="corr", semi_threshold=0.3,
        semi_ema=0.9, **kw,
    )  # fmt: skip


@pytest.mark.slow
def test_teacher_student_resumes_exactly_and_evaluates_the_teacher(store, tmp_path):
    straight = tmp_path / "a"
    fit(semi_config(store, straight))
    split = tmp_path / "b"

    def interrupt(log):
        if log.step == 3:  # after last.pt was written at step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(semi_config(store, split, save_every=2), on_log=interrupt)
    assert load_checkpoint(split / "last.pt")["step"] == 2
    fit(semi_config(store, split, save_every=2), resume=True)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    for part in ("model", "teacher"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part} {k}")
    assert any(not torch.equal(a["model"][k], a["teacher"][k]) for k in a["model"])
    used = model_from_checkpoint(a, "cpu").state_dict()
    assert all(torch.equal(used[k], a["teacher"][k]) for k in used)  # eval/predict: the teacher


@pytest.mark.slow
def test_image_only_splits_join_the_unlabelled_images(tmp_path):
    data, url = tmp_path / "cs", str(tmp_path / "cs.zarr")
    m = load_manifest("cityscapes")
    write_sample(m, data, {"train": 2, "val": 1, "train_extra": 3}, size=(64, 128))
    options = BuildOptions(scales=(0.5,), splits=("train", "val", "train_extra"))
    build(m, data, url, options)
    s = SoftStore(url)
    extra = np.flatnonzero(s.split_of() == "train_extra")
    with ExitStack() as cleanup:
        regime = open_inputs(
            semi_config(url, tmp_path / "r", labeled="1"), Ranks(), False, False, cleanup
        ).regime
    train, unlabeled = regime.labelled, regime.unlabelled
    assert list(train.items) == list(np.flatnonzero(s.split_of() == "train"))
    assert list(unlabeled.items) == list(extra)  # every train image labelled, the rest extra
    with ExitStack() as cleanup:
        regime = open_inputs(
            semi_config(url, tmp_path / "r"), Ranks(), False, False, cleanup
        ).regime
    train, unlabeled = regime.labelled, regime.unlabelled
    assert len(train) == 1 and set(extra) < set(unlabeled.items) and len(unlabeled) == 4
    assert fit(semi_config(url, tmp_path / "run", labeled="1", iters=2))["step"] == 2


def test_inverse_sqrt_class_weights_count_the_labelled_share_only(store, tmp_path):
    """The unlabelled images' labels are never seen: not even through the class weights."""
    cfg = semi_config(store, tmp_path / "r", class_weights="inverse-sqrt")
    with ExitStack() as cleanup:
        regime = open_inputs(cfg, Ranks(), False, False, cleanup).regime
    s = SoftStore(store)
    counts = s.full_counts()[:, : s.num_classes].astype(np.float64)

    def inverse_sqrt(items):  # by hand: 1 / sqrt(pixel share), mean 1 over present classes
        share = counts[items].sum(0) / counts[items].sum()
        w = np.where(share > 0, 1 / np.sqrt(np.maximum(share, 1e-300)), 0)
        return w / w[share > 0].mean()

    labelled, everything = (
        regime.labelled.items,
        np.union1d(regime.labelled.items, regime.unlabelled.items),
    )
    assert 0 < len(labelled) < len(everything)
    assert not np.allclose(inverse_sqrt(labelled), inverse_sqrt(everything), rtol=1e-3)
    np.testing.assert_allclose(regime.class_weights.numpy(), inverse_sqrt(labelled), rtol=1e-5)


def test_labeled_list_names_the_partition_file_on_the_command_line(store, tmp_path):
    from typer.testing import CliRunner

    from softtrain.cli import app

    out, listing = tmp_path / "run", tmp_path / "nowhere.txt"
    args = ["fit", "--store", store, "--out", str(out), "--labeled-list", str(listing)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "nowhere.txt: not a fraction nor a partition list file" in r.output
    assert not out.exists()


def test_partition_lists_match_whole_names_never_prefixes(tmp_path):
    names = np.array(["a/1", "a/2", "a/10", "a/20", "b/x_leftImg8bit_3", "c/7", "d/7"])
    items = np.arange(len(names))
    listing = tmp_path / "part.txt"
    listing.write_text("train/10.jpg extra columns\n20.jpg\n")
    assert list(partition(names, items, str(listing), 0)[0]) == [2, 3]
    listing.write_text("x_leftImg8bit_3_leftImg8bit.png\n1.png\n")  # the dataset's suffix comes off
    assert list(partition(names, items, str(listing), 0, "_leftImg8bit.png")[0]) == [0, 4]
    for text, why in [
        ("100.jpg\n", "match no training image"),  # "10" is a prefix of it: no match
        ("1\n3.jpg\n", "match no training image"),
        ("7.png\n", "several training images"),  # c/7 and d/7
        ("\n\n", "names no image"),  # an empty list: blamed on the file, not the store
    ]:
        listing.write_text(text)
        with pytest.raises(ValueError, match=why):
            partition(names, items, str(listing), 0)


@pytest.mark.parametrize("bad", ["1/0", "1e400", "0", "3/2", "-1/8"])
def test_labeled_fractions_outside_the_unit_interval_are_sentences(bad):
    with pytest.raises(ValueError, match=r"not a fraction in \(0, 1\]"):
        partition(np.array(["a", "b"]), np.arange(2), bad, 0)


def test_teacher_student_without_labeled_names_the_option(store, tmp_path):
    cfg = semi_config(store, tmp_path / "r", labeled="", regime="teacher-student")
    with ExitStack() as cleanup, pytest.raises(ValueError, match="needs --labeled"):
        open_inputs(cfg, Ranks(), False, False, cleanup)


@pytest.fixture(scope="module")
def padded_store(tmp_path_factory):
    """Images with no black pixel (RGB >= 1), so black in a crop is padding: an oracle."""
    from PIL import Image

    data = tmp_path_factory.mktemp("padded")
    m = load_manifest("cityscapes")
    write_sample(m, data / "cs", {"train": 4, "val": 1}, size=(64, 128))
    for png in (data / "cs/leftImg8bit").rglob("*.png"):
        Image.fromarray(np.maximum(np.asarray(Image.open(png).convert("RGB")), 1)).save(png)
    url = str(data / "cs.zarr")
    build(m, data / "cs", url, BuildOptions(scales=(0.5,)))
    return url  # 32x64 images at 1/2, against 48x96 crops


def test_unlabelled_padding_is_marked_and_cutmix_carries_it(padded_store, tmp_path, monkeypatch):
    """The unsupervised losses see which pixels of an unlabelled crop are image, through
    CutMix too: a crop larger than its image is padded with black, never trained on."""
    from softtrain import semi
    from softtrain.models import build_model

    cfg = semi_config(padded_store, tmp_path / "r", crop="48x96", unlabeled_batch=3, labeled="1/4")
    boxes, seen = [], []
    real_boxes = semi.cutmix_boxes
    monkeypatch.setattr(semi, "cutmix_boxes", lambda *a: boxes.append(real_boxes(*a)) or boxes[-1])
    with ExitStack() as cleanup:
        regime = open_inputs(cfg, Ranks(), False, False, cleanup).regime
        model = build_model("deeplabv3plus_r18", 19).eval()
        regime.start(model)
        monkeypatch.setattr(regime, "unsupervised", lambda *a: seen.append(a[2]) or a[0].sum() * 0)
        flips = set()
        for micro, batch in zip(range(4), regime.batches(0, cleanup)):
            image = batch["unlabeled"]
            valid = valid_mask(batch["unlabeled_size"], batch["unlabeled_flipped"], (48, 96))
            assert valid.shape == (3, 48, 96) and not valid.all()
            assert torch.equal(valid, image.amax(1) > 0)  # black only on padding
            prepared = _prepare(batch, micro, cfg, torch.device("cpu"), 0)
            regime.loss(lambda x, module=None: (module or model)(x), prepared, 0, micro)
            box = boxes[-1]
            assert torch.equal(seen[-1], torch.where(box, valid.roll(1, dims=0), valid))
            flips |= {bool(valid[i, 0, 0]) for i in range(3)}
    assert flips == {True, False}  # padding on the right and, flipped, on the left


def test_unsupervised_losses_ignore_padding():
    """Whatever the teacher and student say on padding, the loss is the same; and it is
    the loss of the image pixels alone."""
    from types import SimpleNamespace

    from softtrain.config import FitConfig
    from softtrain.semi import TeacherStudent

    torch.manual_seed(0)
    cfg = FitConfig.of(store="x", labeled="1/2", semi_esl=True, semi_ipix="corr",
                       semi_threshold=0.5)  # fmt: skip
    regime = SimpleNamespace(opts=cfg.semi, cfg=cfg)
    logp = torch.randn(2, 5, 12, 16).log_softmax(1)
    probs = (3 * torch.randn(2, 5, 12, 16)).softmax(1)
    valid = torch.zeros(2, 12, 16, dtype=torch.bool)
    valid[:, :8, :10] = True

    def loss(lp, p, v, ipix="corr"):
        regime.opts = cfg.semi.__class__(**{**vars(cfg.semi), "ipix": ipix})
        return TeacherStudent.unsupervised(regime, lp, p, v, 3, torch.Generator().manual_seed(1))

    noise_lp = torch.randn_like(logp).log_softmax(1)
    noise_p = (5 * torch.randn_like(probs)).softmax(1)
    pad = ~valid[:, None]
    torch.testing.assert_close(
        loss(logp, probs, valid),
        loss(torch.where(pad, noise_lp, logp), torch.where(pad, noise_p, probs), valid),
    )
    inside = (logp[..., :8, :10], probs[..., :8, :10], valid[:, :8, :10])
    torch.testing.assert_close(loss(logp, probs, valid, "none"), loss(*inside, "none"))


def test_the_strong_view_of_a_padded_crop_is_that_of_its_image():
    """Colour jitter about the image's own mean, blur that reads the image's edge: padding
    changes nothing inside the image."""
    from softtrain.semi import strong_view

    torch.manual_seed(0)
    image = torch.randint(0, 256, (4, 3, 20, 30), dtype=torch.uint8)
    padded = torch.zeros(4, 3, 32, 48, dtype=torch.uint8)
    padded[..., :20, :30] = image
    valid = torch.zeros(4, 32, 48, dtype=torch.bool)
    valid[:, :20, :30] = True
    alone = strong_view(image, torch.Generator().manual_seed(3), torch.ones(4, 20, 30).bool())
    inside = strong_view(padded, torch.Generator().manual_seed(3), valid)[..., :20, :30]
    torch.testing.assert_close(inside, alone, rtol=0, atol=1e-3)


def test_the_unlabelled_share_never_reads_a_label(store, tmp_path, monkeypatch):
    """Not to place a crop either: --cat-max-ratio moved unlabelled crops by their labels."""
    read = []
    real = SoftStore.read_soft
    monkeypatch.setattr(SoftStore, "read_soft", lambda s, *a: read.append(a[1]) or real(s, *a))
    cfg = semi_config(store, tmp_path / "r", cat_max_ratio=0.3, labeled="1/4")
    with ExitStack() as cleanup:
        regime = open_inputs(cfg, Ranks(), False, False, cleanup).regime
        for _, batch in zip(range(4), regime.batches(0, cleanup)):
            assert batch["unlabeled"].shape[0] == 2
    assert read and set(read) <= set(regime.labelled.items)
    assert not set(read) & set(regime.unlabelled.items)


def test_the_strong_views_colour_jitter_is_torchvisions():
    """Brightness, contrast, saturation against torchvision's functional ops (the oracle),
    with the factors the generator drew (seeds where grayscale and blur are not drawn)."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    from softtrain.semi import strong_view

    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 16, 20), dtype=torch.uint8)
    checked = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        r = [float(torch.rand(1, 1, 1, 1, generator=g)) for _ in range(4)]
        sigma_and_blur = torch.rand(1, generator=g), float(torch.rand(1, 1, 1, 1, generator=g))
        if r[3] < 0.2 or sigma_and_blur[1] < 0.5:
            continue  # grayscale or blur drawn
        ours = strong_view(image, torch.Generator().manual_seed(seed), torch.ones(1, 16, 20).bool())
        x = image.float() / 255
        x = tvf.adjust_brightness(x, 0.6 + 0.8 * r[0])
        x = tvf.adjust_contrast(x, 0.6 + 0.8 * r[1])
        x = tvf.adjust_saturation(x, 0.6 + 0.8 * r[2])
        torch.testing.assert_close(ours / 255, x, rtol=0, atol=2e-3)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize(
    "option, value, why",
    [("semi_threshold", 1.5, "must be in \\[0, 1\\]"), ("semi_esl_weight", -1.0, "must be at least 0"),
     ("semi_ipix_weight", -3.0, "must be at least 0")],
)  # fmt: skip
def test_semi_options_that_would_do_nothing_or_ascend_the_loss_are_refused(option, value, why):
    with pytest.raises(ValueError, match=f"--{option.replace('_', '-')} {why}"):
        FitConfig.of(store="x", labeled="1/2", **{option: value})


def test_teacher_student_options_of_a_supervised_run_are_refused_not_ignored():
    for flat in [dict(semi_esl=True), dict(regime="supervised", labeled="1/8"),
                 dict(unlabeled_batch=4, semi_ipix="kl")]:  # fmt: skip
        with pytest.raises(ValueError, match="options of the teacher-student regime"):
            FitConfig.of(store="x", **flat)
    assert FitConfig.of(store="x", labeled="1/8", semi_esl=True).regime == "teacher-student"


def test_a_labelled_share_smaller_than_a_batch_is_blamed_on_labeled(store, tmp_path):
    cfg = semi_config(store, tmp_path / "r", labeled="1/8", batch_size=2)
    with (
        ExitStack() as cleanup,
        pytest.raises(TrainingError, match=r"1 labelled images \(--labeled"),
    ):
        open_inputs(cfg, Ranks(), False, False, cleanup)
