"""softtrain: loss identities, mIoU against torchmetrics, a tiny model learning, resume."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from softprep.build import BuildOptions, build
from softprep.manifest import load_manifest
from softtrain import fit as fit_module
from softtrain import weak_losses as weak_module
from softtrain.checkpoint import CheckpointError, load_checkpoint
from softtrain.data import CropDataset, densify
from softtrain.fit import FitConfig, fit
from softtrain.losses import soft_label_loss
from softtrain.metrics import Confusion
from softtrain.models import build_model
from softtrain.predict import predict


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("train") / "cs.zarr")
    build(
        load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.125, 0.25))
    )
    return url


@pytest.fixture(scope="module")
def batch(store):
    data = CropDataset(store, (32, 64), "train", levels=["1/8"], seed=1)
    return next(iter(DataLoader(data, batch_size=4)))


def test_soft_loss_without_mc_equals_hard_cross_entropy(batch):
    torch.manual_seed(0)
    logits = torch.randn(4, 19, 32, 64, requires_grad=True)
    soft = soft_label_loss(logits, batch["index"], batch["prob"], "soft", mc="exclude")
    hard_target = batch["index"][:, 0].long()
    probs, void = densify(batch["index"], batch["prob"], 19)
    mc = (probs > 0).sum(1) > 1
    hard_target[mc] = 255  # the paper's "MC excluded": only single-class pixels
    oracle = F.cross_entropy(logits, hard_target, ignore_index=255)
    assert mc.any() and soft.kept == (hard_target != 255).sum()
    torch.testing.assert_close(soft.loss, oracle, rtol=0, atol=1e-6)
    assert soft.kl.item() == pytest.approx(soft.loss.item(), abs=1e-6)  # one-hot targets: H(q) = 0


def test_soft_loss_equals_torch_probability_targets(batch):
    torch.manual_seed(1)
    logits = torch.randn(4, 19, 32, 64)
    probs, void = densify(batch["index"], batch["prob"], 19)
    keep = void == 0
    ours = soft_label_loss(logits, batch["index"], batch["prob"])
    # torch's cross_entropy with probability targets, on pixels without void
    ce = F.cross_entropy(logits, probs, reduction="none")
    partial = (void > 0) & (void <= 0.5)
    renorm = probs / (1 - void).clamp_min(1e-6)[:, None]
    ce_partial = F.cross_entropy(logits, renorm, reduction="none")
    expected = (ce[keep].sum() + ce_partial[partial].sum()) / (keep.sum() + partial.sum())
    torch.testing.assert_close(ours.loss, expected, rtol=1e-5, atol=1e-6)
    kl = F.kl_div(F.log_softmax(logits, 1), renorm, reduction="none").sum(1)
    kept = keep | partial
    torch.testing.assert_close(ours.kl, kl[kept].mean(), rtol=1e-4, atol=1e-5)


def test_confusion_miou_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics")
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.integers(0, 6, (3, 50, 70)))
    target[:, :5] = 255
    pred = torch.where(
        torch.rand(target.shape) < 0.7, target.clamp_max(5), torch.randint(0, 6, target.shape)
    )
    c = Confusion(7)  # class 6 absent from both: excluded from the mean
    c.update(pred, target)
    metric = tm.classification.MulticlassJaccardIndex(
        num_classes=7, ignore_index=255, average="none"
    )
    per_class = metric(pred, target)
    np.testing.assert_allclose(c.iou()[:6], per_class[:6].numpy(), rtol=1e-6)
    assert c.miou() == pytest.approx(per_class[:6].mean().item(), rel=1e-6)


def tiny_config(store, out, **kw):
    return FitConfig.of(
        store=store,
        out=str(out),
        model="deeplabv3plus_r18",
        crop="32x64",
        levels=["1/8"],
        batch_size=4,
        iters=kw.pop("iters", 4),
        lr=0.02,
        workers=0,
        device="cpu",
        log_every=1,
        **kw,
    )


@pytest.mark.slow
def test_tiny_model_loss_falls_and_eval_runs(store, tmp_path):
    logs = []
    result = fit(
        tiny_config(store, tmp_path / "run", iters=30, eval_level="1/8"), on_log=logs.append
    )
    losses = [log.loss for log in logs]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first
    assert 0 <= result["last_miou"] <= 1
    assert (tmp_path / "run/best.pt").exists() and (tmp_path / "run/config.toml").exists()
    cfg = FitConfig.from_toml(tmp_path / "run/config.toml")
    assert cfg.optim.iters == 30 and cfg.optim.model == "deeplabv3plus_r18"


@pytest.mark.slow
def test_resume_continues_exactly(store, tmp_path):
    straight = tmp_path / "a"
    fit(tiny_config(store, straight, iters=4, eval_every=2))
    split = tmp_path / "b"
    cfg = tiny_config(store, split, iters=4, eval_every=2)

    def interrupt(log):
        if log.step == 3:  # after last.pt was written at step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, on_log=interrupt)
    assert load_checkpoint(split / "last.pt")["step"] == 2
    fit(cfg, resume=True)
    a = load_checkpoint(straight / "last.pt")["model"]
    b = load_checkpoint(split / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_checkpoint_for_other_classes_is_refused(store, tmp_path, samples):
    fit(tiny_config(store, tmp_path / "run", iters=1))
    other = str(tmp_path / "ade.zarr")
    build(load_manifest("ade20k"), samples["ade20k"], other, BuildOptions(scales=(0.25,)))
    from softtrain.evaluate import eval_checkpoint

    with pytest.raises(CheckpointError, match="another class table"):
        eval_checkpoint(str(tmp_path / "run/last.pt"), other)


def test_an_eval_level_the_store_lacks_is_refused_before_training(store, tmp_path):
    """A typo in --eval-level must not train a whole run unevaluated, without best.pt."""
    with pytest.raises(fit_module.TrainingError, match="--eval-level.*no level 1/2"):
        fit(tiny_config(store, tmp_path / "run", iters=1, eval_level="1/2"))
    assert not (tmp_path / "run").exists()


def test_eval_split_none_trains_unevaluated(store, tmp_path):
    """``--eval-split none`` (benchmarks that score the final weights themselves): no
    evaluation at the end or every N steps, no best.pt, and the banner says why."""
    from softtrain.runlog import read_metrics

    said = []
    cfg = tiny_config(store, tmp_path / "run", iters=2, eval_every=1, eval_split="none")
    result = fit(cfg, on_start=said.extend)
    assert (tmp_path / "run/last.pt").exists() and not (tmp_path / "run/best.pt").exists()
    assert result["last_miou"] is None
    assert not [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if "mIoU" in r]
    assert "evaluation: none (--eval-split none)" in said


def test_an_accumulated_step_logs_the_mean_of_its_micro_batches(store, tmp_path, monkeypatch):
    """With --accum 2 the logged loss and KL are the step's, not its last micro-batch's."""
    real, seen = weak_module.soft_label_loss, []

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((out.loss.item(), out.kl.item()))
        return out

    monkeypatch.setattr(weak_module, "soft_label_loss", recording)  # what fit calls
    logs = []
    fit(tiny_config(store, tmp_path / "run", iters=2, accum=2), on_log=logs.append)
    assert len(seen) == 4 and len(logs) == 2
    for log, pair in zip(logs, (seen[:2], seen[2:])):
        assert pair[0][0] != pytest.approx(pair[1][0])  # the two micro-batches differ
        assert log.loss == pytest.approx(np.mean([loss for loss, _ in pair]), rel=1e-6)
        assert log.kl == pytest.approx(np.mean([kl for _, kl in pair]), rel=1e-6)


@pytest.mark.slow  # trains for seconds: keeps the fast tier under a minute
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(store, tmp_path, monkeypatch):
    real = weak_module.soft_label_loss
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] > 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(weak_module, "soft_label_loss", exploding)  # what fit calls
    with pytest.raises(fit_module.TrainingError, match="loss is nan at step 2.*step 2. is intact"):
        fit(tiny_config(store, tmp_path / "run", iters=6, eval_every=2))
    ckpt = load_checkpoint(tmp_path / "run/last.pt")
    assert ckpt["step"] == 2 and all(
        torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()
    )


def test_predict_writes_label_pngs(store, tmp_path, samples):
    from PIL import Image

    fit(tiny_config(store, tmp_path / "run", iters=1))
    image = next((samples["cityscapes"] / "leftImg8bit/val").rglob("*.png"))
    files = predict(
        str(tmp_path / "run/last.pt"), [image], tmp_path / "pred", "palette", device="cpu"
    )
    label = Image.open(files[0])
    assert label.mode == "P" and label.size == Image.open(image).size
    assert np.asarray(label).max() < 19


@pytest.mark.parametrize("name,params", [("hrnetv2_w48", 65.9e6), ("deeplabv3plus_r50", 40.4e6)])
def test_model_registry_sizes(name, params):
    model = build_model(name, 19)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_model(name, 19, pretrained="/nonexistent.pth")


def test_a_model_added_to_the_registry_is_built_and_accepted_by_fit(monkeypatch):
    import softtrain
    from softtrain.config import OptimOptions

    monkeypatch.setitem(softtrain.MODELS, "hrnetv2_w18_small", ("HRNetV2", "hrnet_w18_small"))
    model = build_model("hrnetv2_w18_small", 5)
    assert type(model).__name__ == "HRNetV2" and model.trunk.default_cfg["architecture"] == (
        "hrnet_w18_small"
    )
    assert OptimOptions(model="hrnetv2_w18_small").model == "hrnetv2_w18_small"
    with pytest.raises(ValueError, match="unknown model 'hrnetv2_w9'"):
        OptimOptions(model="hrnetv2_w9")


def test_hrnet_takes_any_input_size():
    """timm's HRNet fuses branches by exact 2x steps, so sizes that are not multiples of 32
    (CamVid at 1/8: 45x60) broke it; logits are at stride 4 of the input, and padding the
    input to a multiple of 32 changes nothing at sizes that are multiples already."""
    torch.manual_seed(0)
    model = build_model("hrnetv2_w18", 5).eval()
    with torch.no_grad():
        for h, w in [(45, 60), (32, 40), (50, 50), (33, 97)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 5, -(-h // 4), -(-w // 4))
        x = torch.randn(1, 3, 64, 96)
        plain = model.head(
            torch.cat(
                [f if i == 0 else torch.nn.functional.interpolate(
                    f, size=(16, 24), mode="bilinear", align_corners=False)
                 for i, f in enumerate(model.trunk(x))], dim=1)
        )  # fmt: skip
        torch.testing.assert_close(model(x), plain)


@pytest.mark.slow  # 10-14 s each: the ONNX exporter
@pytest.mark.parametrize(
    "head,trunk", [("HRNetV2", "hrnet_w18_small"), ("DeepLabV3Plus", "resnet18")]
)
def test_the_heads_exported_take_any_input_size(tmp_path, head, trunk):
    """Traced TorchScript and ONNX (symbolic sizes) against eager PyTorch at sizes other than
    the traced one: HRNet's crop to ceil(h / 4) once read -(-h // 4), whose floor division of
    a negative number the ONNX export truncated (11 rows, not 12, at 45x60); DeepLabV3+ pools
    the whole image (ASPP) and resizes to its stride-4 features. (The tests of ``export``
    itself wrap a tiny model: ``tests.tinynet``.)"""
    ort = pytest.importorskip("onnxruntime")
    from softtrain.models import HEADS

    torch.manual_seed(0)
    model, path = HEADS[head](trunk, 5).eval(), tmp_path / "model.onnx"
    example = torch.randn(1, 3, 64, 96)
    dims = {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    torch.onnx.export(
        model, (example,), str(path), input_names=["x"], dynamo=True,
        external_data=False, verbose=False, dynamic_shapes=(dims,),
    )  # fmt: skip
    session = ort.InferenceSession(str(path))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
        traced = torch.jit.trace(model, example, check_trace=False)
    for h, w in [(45, 60), (33, 97), (64, 96)]:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            eager, scripted = model(x).numpy(), traced(x).numpy()
        for fmt, out in (
            ("onnx", session.run(None, {"x": x.numpy()})[0]),
            ("torchscript", scripted),
        ):
            assert out.shape == eager.shape == (1, 5, -(-h // 4), -(-w // 4)), (fmt, h, w)
            assert np.abs(out - eager).max() < 1e-5 * np.abs(eager).max(), (fmt, h, w)


def test_pretrained_trunk_weights_come_from_a_local_file(tmp_path):
    import timm

    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("deeplabv3plus_r18", 19, pretrained=str(path))
    torch.testing.assert_close(model.trunk.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.trunk.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_predict_never_writes_over_or_among_its_inputs(store, tmp_path, samples):
    import os
    import shutil

    fit(tiny_config(store, tmp_path / "run", iters=1))
    ckpt = str(tmp_path / "run/last.pt")
    photos = tmp_path / "photos"
    shutil.copytree(samples["cityscapes"] / "leftImg8bit/val", photos)
    jpeg = photos / "one.jpg"
    from PIL import Image

    Image.new("RGB", (64, 32), (90, 120, 30)).save(jpeg)
    os.symlink(photos, tmp_path / "alias")
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    city = next(p for p in photos.iterdir() if p.is_dir())
    cases = [
        ([photos], photos, None, "is the input"),
        ([photos], city, None, "lies inside the input"),
        ([city], photos, None, "contains the input"),
        ([jpeg], photos, None, "contains the input"),
        ([jpeg], jpeg, None, "is a file"),
        ([photos], tmp_path / "pred", photos, "--overlays .* is the input"),
        ([tmp_path / "alias"], photos / "out", None, "lies inside the input"),  # via a symlink
        ([jpeg, city], tmp_path / "pred", city / "overlays", "--overlays .* lies inside"),
    ]
    for inputs, out, overlays, why in cases:
        with pytest.raises(ValueError, match=why):
            predict(ckpt, inputs, out, "trainIds", overlays=overlays, device="cpu")
    cwd = os.getcwd()
    try:  # relative paths: the current folder is the input folder
        os.chdir(photos)
        with pytest.raises(ValueError, match="is the input"):
            predict(ckpt, [photos], type(photos)("."), device="cpu")
    finally:
        os.chdir(cwd)
    after = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    assert after == before  # nothing replaced, nothing added
    written = predict(ckpt, [jpeg], tmp_path / "pred", overlays=tmp_path / "ov", device="cpu")
    assert written == [tmp_path / "pred/one.png"] and (tmp_path / "ov/one.jpg").is_file()


@pytest.mark.slow
def test_pretrained_reads_torchvision_and_mmseg_layouts_and_refuses_the_rest(tmp_path, store):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)  # torchvision's own key names
    layouts = {
        "torchvision.pth": reference.state_dict(),
        "mmseg.pth": {  # mmcv: {"meta", "state_dict"} with the backbone under "backbone."
            "meta": {"epoch": 1},
            "state_dict": {f"backbone.{k}": v for k, v in reference.state_dict().items()}
            | {"decode_head.conv_seg.weight": torch.zeros(19, 512, 1, 1)},
        },
        "ddp.pth": {"model": {f"module.{k}": v for k, v in reference.state_dict().items()}},
    }
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        model = build_model("deeplabv3plus_r18", 19, pretrained=str(tmp_path / name))
        torch.testing.assert_close(
            model.trunk.layer3[0].conv1.weight, reference.layer3[0].conv1.weight
        )
    import timm

    torch.save(timm.create_model("resnet50").state_dict(), tmp_path / "r50.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 100)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    fit(tiny_config(store, tmp_path / "run", iters=1))
    refused = {
        "r50.pth": "only .* of the .* tensors of resnet18 match by name and shape",
        "junk.pth": "not a weights file",
        "list.pth": "holds no tensors by name",
        "run/last.pt": "softtrain checkpoint",
    }
    for name, why in refused.items():
        with pytest.raises(ValueError, match=why):
            build_model("deeplabv3plus_r18", 19, pretrained=str(tmp_path / name))
