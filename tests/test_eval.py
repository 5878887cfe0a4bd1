"""softtrain eval and predict: mmseg metrics against torchmetrics, slide windows, chunked
upsampling, label-less splits refused, prediction formats through the manifest, and the
official Cityscapes evaluator scoring our predictions exactly as ``softtrain eval`` does."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import softtrain.evaluate as evaluation
from softprep.build import BuildOptions, build
from softprep.datasets import decode_label
from softprep.manifest import load_manifest
from softprep.store import StoreError
from softtrain.cli import app
from softtrain.config import FitConfig
from softtrain.data import normalise
from softtrain.evaluate import InferenceOptions, eval_checkpoint, eval_dataset
from softtrain.fit import fit
from softtrain.metrics import Confusion, eval_record
from softtrain.predict import predict
from tests.tinynet import TINY

runner = CliRunner()


def trained(samples, base: Path, dataset: str, version=None, short_side=None) -> tuple[str, str]:
    """A store of ``dataset``'s sample in ``base`` and a 6-step run of ``tests.tinynet`` on it
    (what is tested here wraps any model; the heads' own export: test_train): (url, last.pt)."""
    url = str(base / "s.zarr")
    key = dataset if version is None else f"{dataset}-{version}"
    options = BuildOptions(scales=(0.125, 0.25), short_side=short_side)
    build(load_manifest(dataset, version), samples[key], url, options)
    cfg = FitConfig.of(
        store=url,
        out=str(base / "run"),
        model=TINY,
        crop="32x64",
        levels=["1/8"],
        batch_size=2,
        iters=6,
        lr=0.05,
        workers=0,
        device="cpu",
        eval_level="1/4",
    )
    fit(cfg)
    return url, str(base / "run/last.pt")


@pytest.fixture(scope="module")
def cityscapes_run(samples, tmp_path_factory):
    return trained(samples, tmp_path_factory.mktemp("cityscapes"), "cityscapes")


@pytest.mark.slow  # 2-6 s: keeps the fast tier under a minute
def test_accuracy_metrics_match_torchmetrics():
    tm = pytest.importorskip("torchmetrics")
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.integers(0, 5, (2, 40, 60)))
    target[:, :4] = 255
    pred = torch.where(
        torch.rand(target.shape) < 0.6, target.clamp_max(4), torch.randint(0, 6, target.shape)
    )
    c = Confusion(6)  # class 5 only predicted, never true: Acc undefined, IoU 0
    c.update(pred, target)
    recall = tm.classification.MulticlassRecall(num_classes=6, ignore_index=255, average="none")
    np.testing.assert_allclose(c.accuracy()[:5], recall(pred, target)[:5].numpy(), rtol=1e-6)
    assert np.isnan(c.accuracy()[5]) and c.iou()[5] == 0
    micro = tm.classification.MulticlassAccuracy(num_classes=6, ignore_index=255, average="micro")
    assert c.pixel_accuracy() == pytest.approx(micro(pred, target).item(), rel=1e-6)
    record = eval_record(c, list("abcdef"), step=3)
    assert record["classes"][5] == {"class": "f", "iou": 0.0, "acc": None}
    assert record["mAcc"] == pytest.approx(np.nanmean(c.accuracy()))
    json.dumps(record, allow_nan=False)  # NaN-free


def test_empty_confusion_gives_nulls_not_nan():
    record = eval_record(Confusion(3), ["a", "b", "c"])
    assert record["mIoU"] is None and record["mAcc"] is None
    json.dumps(record, allow_nan=False)


def test_slide_windows_cover_the_image_exactly():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 5, 1)  # per-pixel: any window arrangement gives the same logits
    image = torch.randint(0, 256, (1, 3, 23, 37), dtype=torch.uint8)
    expected = model(normalise(image))
    for window, stride in [((8, 10), (5, 6)), ((23, 37), (1, 1)), ((30, 50), (20, 20))]:
        got = evaluation._slide(model, image, window, stride, bf16=False)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_chunked_upsample_argmax_equals_upsampling_at_once(monkeypatch):
    scores = torch.randn(1, 70, 9, 13)
    expected = F.interpolate(scores, (40, 50), mode="bilinear", align_corners=False).argmax(1)[0]
    monkeypatch.setattr(evaluation, "CLASS_CHUNK", 16)
    assert torch.equal(evaluation.upsample_argmax(scores, (40, 50)), expected)


def test_flip_tta_of_a_flip_equivariant_model_changes_nothing():
    torch.manual_seed(1)
    model = torch.nn.Conv2d(3, 4, 1)
    image = torch.randint(0, 256, (1, 3, 16, 24), dtype=torch.uint8)
    plain = evaluation.segment_scores(model, [image], InferenceOptions(), None, None)
    flipped = evaluation.segment_scores(model, [image], InferenceOptions(flip=True), None, None)
    torch.testing.assert_close(flipped, plain.softmax(1), rtol=1e-5, atol=1e-6)


def test_slide_and_tta_evaluate_end_to_end(cityscapes_run):
    url, ckpt = cityscapes_run
    whole, _ = eval_checkpoint(ckpt, url, device="cpu")
    slide, ctx = eval_checkpoint(
        ckpt,
        url,
        device="cpu",
        opts=InferenceOptions("slide", "32x64", "16x32", flip=True, tta_levels=("1/8",)),
    )
    assert ctx["mode"] == "slide" and ctx["tta_levels"] == ["1/8"]
    assert slide.labelled_pixels() == whole.labelled_pixels() > 0


def test_split_without_labels_is_refused(cityscapes_run, tmp_path):
    url, ckpt = cityscapes_run
    with pytest.raises(StoreError, match="split 'train' has no full-resolution labels"):
        eval_dataset(url, "1/4", "train")
    r = runner.invoke(
        app,
        ["eval", "--store", url, "--checkpoint", ckpt, "--split", "train", "--device", "cpu",
         "--json", str(tmp_path / "m.json")],
    )  # fmt: skip
    assert r.exit_code == 2 and "no full-resolution labels" in " ".join(r.output.split())
    assert not (tmp_path / "m.json").exists()
    r = runner.invoke(
        app,
        ["eval", "--store", url, "--checkpoint", ckpt, "--device", "cpu", "--decode", "bias",
         "--fit-split", "train"],
    )  # fmt: skip
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "nothing to fit the decode on (--fit-split)" in said, said


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cityscapes", "ade20k"])
def test_predict_formats_round_trip_through_the_manifest(samples, tmp_path, dataset):
    url, ckpt = trained(samples, tmp_path, dataset)  # tmp_path: removed once it passes
    manifest = load_manifest(dataset)
    folder = next(
        p
        for p in samples[dataset].rglob("*")
        if p.is_dir()
        and p.name in ("val", "validation")
        and "annotations" not in str(p)
        and "gtFine" not in str(p)
    )
    out = tmp_path / "pred"
    files = {
        fmt: predict(ckpt, [folder], out / fmt, fmt, overlays=out / "overlays", device="cpu")
        for fmt in ("trainIds", "labelIds", "palette")
    }
    assert len(files["trainIds"]) == 2 and all(p.suffix == ".png" for p in files["trainIds"])
    for train_png, raw_png, pal_png in zip(files["trainIds"], files["labelIds"], files["palette"]):
        train_ids = np.asarray(Image.open(train_png))
        raw = Image.open(raw_png)
        assert raw.mode == "L" and train_ids.max() < manifest.num_classes
        lut, valid = manifest.lookup_table
        assert valid[np.asarray(raw)].all()
        np.testing.assert_array_equal(lut[np.asarray(raw)], train_ids)  # manifest inverts it
        if dataset == "ade20k":
            np.testing.assert_array_equal(np.asarray(raw), train_ids + 1)
        palette = Image.open(pal_png)
        assert palette.mode == "P"
        np.testing.assert_array_equal(np.asarray(palette), train_ids)
        colours = np.array(palette.getpalette()[: 3 * manifest.num_classes]).reshape(-1, 3)
        np.testing.assert_array_equal(colours, manifest.palette)
    assert len(list((out / "overlays").rglob("*.jpg"))) == 2
    with pytest.raises(ValueError, match="inside --out"):
        predict(ckpt, [folder], out / "x", overlays=out / "x/overlays", device="cpu")
    with pytest.raises(FileNotFoundError, match="no such image file or folder"):
        predict(ckpt, [folder / "missing.png"], out / "y", device="cpu")


def test_official_cityscapes_evaluator_agrees_with_softtrain_eval(
    samples, cityscapes_run, tmp_path
):
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    url, ckpt = cityscapes_run
    root = samples["cityscapes"]
    r = runner.invoke(
        app,
        ["predict", str(root / "leftImg8bit/val"), "--checkpoint", ckpt, "--format", "labelIds",
         "--out", str(tmp_path / "pred"), "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ev.args.groundTruthSearch = str(root / "gtFine/val/*/*_gtFine_labelIds.png")
    ev.args.predictionPath, ev.args.predictionWalk = str(tmp_path / "pred"), None
    ev.args.exportFile = str(tmp_path / "result.json")
    ev.args.evalInstLevelScore, ev.args.quiet = False, True
    gt = sorted(str(p) for p in (root / "gtFine/val").rglob("*_gtFine_labelIds.png"))
    official = ev.evaluateImgLists([ev.getPrediction(ev.args, g) for g in gt], gt, ev.args)
    confusion, _ = eval_checkpoint(ckpt, url, device="cpu")
    assert confusion.labelled_pixels() > 0
    assert official["averageScoreClasses"] == pytest.approx(confusion.miou(), abs=1e-9)
    names = load_manifest("cityscapes").class_names
    for name, iou in zip(names, confusion.iou()):
        theirs = official["classScores"][name]
        assert (np.isnan(iou) and np.isnan(theirs)) or theirs == pytest.approx(iou, abs=1e-9)
    gt_label = decode_label(gt[0], load_manifest("cityscapes"))
    assert gt_label.shape == np.asarray(Image.open(ev.getPrediction(ev.args, gt[0]))).shape


@pytest.mark.slow  # 2-6 s: keeps the fast tier under a minute
def test_decodes_equal_a_dense_reference_and_a_fitted_bias_never_loses_on_its_split(
    cityscapes_run, samples
):
    from dataclasses import replace

    from softprep.decode import Decode

    url, ckpt = cityscapes_run
    model = evaluation.model_from_checkpoint(torch.load(ckpt, weights_only=False), "cpu")
    data = eval_dataset(url, "1/4", "val")
    item = data[0]
    with torch.no_grad():
        scores = model(normalise(item["images"][0][None]))
    size = tuple(item["label"].shape)
    bias = torch.linspace(-1, 1, scores.shape[1])
    opts = InferenceOptions(decode=Decode("bias", tuple(bias.tolist())))
    dense = F.interpolate(scores, size, mode="bilinear", align_corners=False)[0]
    expected = (dense + bias.view(-1, 1, 1)).argmax(0)  # upsample everything, then decide
    assert torch.equal(evaluation.decode_labels(scores, size, opts), expected)
    tta = replace(opts, flip=True)  # averaged probabilities: weights exp(b) on them
    probs = dense.softmax(0)
    assert torch.equal(
        evaluation.decode_labels(dense.softmax(0)[None], size, tta),
        (probs * bias.exp().view(-1, 1, 1)).argmax(0),
    )
    c = len(load_manifest("cityscapes").classes)
    for kind in ("prior", "bias"):
        decode = evaluation.fit_model_decode(
            model, data, c, "cpu", kind, "val", crop="32x64", every=1, max_pixels=None
        )
        plain = evaluation.evaluate(model, data, c, "cpu", InferenceOptions(), "32x64")
        fitted = evaluation.evaluate(
            model, data, c, "cpu", InferenceOptions(decode=decode), "32x64"
        )
        assert decode.fitted_on == "val" and fitted.miou() >= plain.miou() - 1e-9, kind
    r = runner.invoke(
        app,
        [
            "eval",
            "--store",
            url,
            "--checkpoint",
            ckpt,
            "--decode",
            "bias",
            "--split",
            "val",
            "--save-decode",
            str(Path(ckpt).parent / "decodes" / "d.json"),  # its missing folder is made
        ],
    )
    assert r.exit_code == 0 and "optimistic" in r.output, r.output
    image = next((samples["cityscapes"] / "leftImg8bit/val").rglob("*.png"))
    decode_file = Path(ckpt).parent / "decodes" / "d.json"
    args = ["predict", str(image), "--checkpoint", ckpt, "--out", str(Path(ckpt).parent / "p")]
    assert runner.invoke(app, [*args, "--decode", str(decode_file)]).exit_code == 0
    decode_file.write_text("{}")
    r = runner.invoke(app, [*args, "--decode", str(decode_file)])
    assert r.exit_code == 2 and "not a decode written by --save-decode" in r.output


@pytest.mark.slow  # 2-6 s: keeps the fast tier under a minute
def test_segmenter_is_what_predict_uses_and_exports_agree_with_it(
    cityscapes_run, samples, tmp_path
):
    from softtrain.segmenter import Segmenter

    url, ckpt = cityscapes_run
    image = next((samples["cityscapes"] / "leftImg8bit/val").rglob("*.png"))
    segmenter = Segmenter.from_checkpoint(ckpt, "cpu")
    labels = segmenter(image)
    (written,) = predict(ckpt, [image], tmp_path / "pred", device="cpu")
    assert np.array_equal(labels, np.asarray(Image.open(written)))
    rgb = np.asarray(Image.open(image).convert("RGB"))
    assert np.array_equal(segmenter(rgb), labels)  # an array, a PIL image or a file
    batch = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None]
    for fmt, name in (("torchscript", "m.pt"), ("onnx", "m.onnx")):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            r = runner.invoke(
                app, ["export", "--checkpoint", ckpt, "--out", str(tmp_path / name), "--format",
                      fmt, "--size", f"{rgb.shape[0]}x{rgb.shape[1]}"],
            )  # fmt: skip
        assert r.exit_code == 0, r.output
        assert not [w for w in said if "deprecated" in str(w.message)], fmt
        assert [p.name for p in tmp_path.glob("m.*")] == [name]  # one file, self-contained:
        moved = tmp_path / fmt / name  # it works away from where it was written
        moved.parent.mkdir()
        (tmp_path / name).rename(moved)
        if fmt == "torchscript":
            run = torch.jit.load(str(moved))
        else:
            ort = pytest.importorskip("onnxruntime")
            session = ort.InferenceSession(str(moved))

            def run(x, session=session):
                return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

        # the traced size, then others and a batch of two (the export takes any: the ONNX
        # one once did not, and sizes not a multiple of 1/level once resized a row short)
        for h, w, n in ((*rgb.shape[:2], 1), (190, 254, 2), (2, 3, 1)):
            out = run(batch[..., :h, :w].repeat(n, 1, 1, 1)).numpy()
            expected = segmenter(rgb[:h, :w])
            assert out.shape == (n, *expected.shape) and out.dtype == np.uint8, (fmt, h, w)
            agree = (out == expected).mean()
            assert agree > 0.99, f"{fmt} at {h}x{w}: {agree:.4f} of pixels agree with predict"
        # a float image in 0..1 and a channels-last one are refused, saying why (TorchScript
        # once took both and gave wrong labels)
        script = fmt == "torchscript"
        for wrong, why in (
            (batch.float() / 255, "(x * 255).round().to(torch.uint8)" if script else "uint8"),
            (batch.long(), "x.to(torch.uint8)" if script else "uint8"),
            (batch.permute(0, 2, 3, 1).contiguous(), "(B, 3, H, W)" if script else "Expected: 3"),
        ):
            with pytest.raises(Exception) as raised:  # TorchScript: torch.jit.Error
                run(wrong)
            said = str(raised.value)  # TorchScript's ends with the message (its source before)
            assert why in (said.strip().splitlines()[-1] if script else said), said
        hinted = (batch.float() / 255 * 255).round().to(torch.uint8)  # what the error says
        assert torch.equal(run(hinted), run(batch))
        if script:  # loads in eval mode, so TorchScript's freeze takes it
            frozen = torch.jit.freeze(torch.jit.load(str(moved)))
            assert torch.equal(frozen(batch), run(batch))


@pytest.mark.slow  # ~15 s: a run and two exports
def test_an_export_of_a_short_side_store_resizes_as_predict_does(samples, tmp_path):
    """A store built with --short-side scales each image by its own short side: the export
    computes that size from the input's (landscape and portrait), as predict does."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from softtrain.segmenter import Segmenter, export

    _, ckpt = trained(samples, tmp_path, "ade20k", short_side=384)
    segmenter = Segmenter.from_checkpoint(ckpt, "cpu")
    assert segmenter.meta["short_side"] == 384
    export(segmenter, tmp_path / "m.pt", "torchscript", (96, 160))
    export(segmenter, tmp_path / "m.onnx", "onnx", (96, 160))
    scripted, session = (
        torch.jit.load(str(tmp_path / "m.pt")),
        ort.InferenceSession(str(tmp_path / "m.onnx")),
    )
    image = next(samples["ade20k"].rglob("*.jpg"))
    rgb = np.asarray(Image.open(image).convert("RGB"))
    for h, w in ((170, 230), (230, 170), (97, 97)):  # other sizes, other orientations
        crop = np.ascontiguousarray(rgb[:h, :w])
        batch = torch.from_numpy(crop.transpose(2, 0, 1).copy())[None]
        expected = segmenter(crop)
        for fmt, out in (
            ("torchscript", scripted(batch)[0].numpy()),
            ("onnx", session.run(None, {"image": batch.numpy()})[0][0]),
        ):
            assert out.shape == expected.shape, (fmt, h, w)
            agree = (out == expected).mean()
            assert agree > 0.99, f"{fmt} at {h}x{w}: {agree:.4f} of pixels agree with predict"


def test_export_refuses_a_folder_its_own_checkpoint_and_unknown_formats(cityscapes_run, tmp_path):
    url, ckpt = cityscapes_run
    before = Path(ckpt).read_bytes()
    for out, fmt, why in [
        (tmp_path, "torchscript", "is a folder"),
        (Path(ckpt), "torchscript", "is the input"),
        (tmp_path / "m.tfl", "tflite", "unknown export format 'tflite'"),
    ]:
        r = runner.invoke(app, ["export", "--checkpoint", ckpt, "--out", str(out), "--format", fmt])
        assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output, r.output
    for given in (ckpt, url):  # the store (a folder) too: "an input", not "a folder"
        r = runner.invoke(app, ["eval", "--store", url, "--checkpoint", ckpt, "--decode",
                                "prior", "--save-decode", given])  # fmt: skip
        assert r.exit_code == 2 and "is an input" in r.output, r.output
    r = runner.invoke(app, ["eval", "--store", url, "--checkpoint", ckpt, "--decode", "biass"])
    said = " ".join(r.output.split())  # a typo: the choices, not only "no such file"
    assert r.exit_code == 2 and "biass: neither argmax, prior nor bias, and no such" in said
    assert Path(ckpt).read_bytes() == before and not (tmp_path / "m.tfl").exists()
    made = tmp_path / "new" / "m.pt"  # a missing folder is made (was torch's RuntimeError)
    r = runner.invoke(app, ["export", "--checkpoint", ckpt, "--out", str(made), "--size", "32x64"])
    assert r.exit_code == 0 and made.stat().st_size > 0, r.output
