"""softprep fidelity: the sparse bilinear argmax equals a dense torch reference, labels at
1/1 keep everything, the store and dataset paths agree, and the CLI writes its outputs."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from softprep.build import BuildOptions, build
from softprep.cli import MULTI_VALUE, app
from softprep.decode import Decode, prior_decode
from softprep.fidelity import from_dataset, from_store, soft_bilinear_argmax, soft_bilinear_probs
from softprep.manifest import VOID, load_manifest
from softprep.sample import write_sample
from softprep.store import SoftStore, StoreError
from softprep.terminal import expand_multi_value

CS = load_manifest("cityscapes")


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("fid") / "cs.zarr")
    build(CS, samples["cityscapes"], url, BuildOptions(scales=(0.125, 0.3, 1.0)))
    return url


@pytest.fixture(scope="module")
def camvid_store(tmp_path_factory):
    """A generated CamVid (SegNet layout, 360x480) built at 1/8 and 1/4."""
    base = tmp_path_factory.mktemp("camvid")
    m = load_manifest("camvid")
    write_sample(m, base / "CamVid", {"train": 1, "val": 2, "test": 2}, seed=3)
    build(m, base / "CamVid", str(base / "camvid.zarr"), BuildOptions(scales=(0.125, 0.25)))
    return str(base / "camvid.zarr")


def dense_up(index: np.ndarray, prob: np.ndarray, hw, c: int) -> torch.Tensor:
    """torch: densify, bilinear up-sampling (align_corners=False): (C, H, W) float64."""
    ids = torch.from_numpy(np.where(index == VOID, c, index).astype(np.int64))[None]
    dense = torch.zeros((1, c + 1, *index.shape[1:]), dtype=torch.float64)
    dense.scatter_add_(1, ids, torch.from_numpy(prob.astype(np.float64) / 255)[None])
    return F.interpolate(dense[:, :c], size=hw, mode="bilinear", align_corners=False)[0]


def dense_reference(index, prob, hw, c: int, bias=None) -> np.ndarray:
    """Argmax over classes of the dense up-sampling (plus ``bias`` on log p)."""
    up = dense_up(index, prob, hw, c)
    scores = up.log() + torch.tensor(bias or [0.0] * c, dtype=torch.float64)[:, None, None]
    return torch.where(up.amax(0) > 0, scores.argmax(0), VOID).numpy().astype(np.uint8)


def test_sparse_bilinear_argmax_equals_the_dense_reference(store):
    s = SoftStore(store)
    for scale in (0.125, 0.3):
        for i in range(len(s)):
            index, prob = s.read_soft(scale, i)
            hw = tuple(int(v) for v in s.root["images/hw"][i])
            ours = soft_bilinear_argmax(index, prob, hw)
            reference = dense_reference(index, prob, hw, s.num_classes)
            assert (ours != reference).mean() < 1e-4, (scale, i)  # float ties only


def test_decoded_sparse_argmax_equals_the_dense_reference(store):
    s = SoftStore(store)
    bias = [0.0] * s.num_classes
    bias[5], bias[0], bias[7] = 0.9, -0.4, 1.5  # pole, road, traffic sign
    decode = Decode("bias", tuple(bias))
    for i in range(len(s)):
        index, prob = s.read_soft(0.125, i)
        hw = tuple(int(v) for v in s.root["images/hw"][i])
        ours = soft_bilinear_argmax(index, prob, hw, decode)
        assert (ours != dense_reference(index, prob, hw, s.num_classes, bias)).mean() < 1e-4, i
        plain = soft_bilinear_argmax(index, prob, hw)
        np.testing.assert_array_equal(  # tau 0: exactly the argmax
            soft_bilinear_argmax(index, prob, hw, prior_decode(np.ones(s.num_classes), 0.0)),
            plain,
        )
        assert (ours != plain).any()
        up = soft_bilinear_probs(index, prob, hw, s.num_classes)
        assert up.dtype == np.float32 and up.shape == (s.num_classes, *hw)
        np.testing.assert_allclose(up, dense_up(index, prob, hw, s.num_classes), atol=1e-6)


def test_labels_at_full_resolution_keep_all_of_the_truth(store):
    report = from_store(SoftStore(store), ["nn", "nn-floor"], "val")
    assert report.images == 2
    for strategy in report.strategies:
        assert report.miou("1/1", strategy) == 1.0
    assert report.miou("1/8", "soft") < 1.0


def test_store_and_dataset_paths_agree(samples, store):
    from_s = from_store(SoftStore(store), ["nn"], "val")
    from_d = from_dataset(
        CS, samples["cityscapes"], BuildOptions(scales=(0.125, 0.3, 1.0)), ["nn"], "val"
    )
    for level in from_s.levels:
        for s in from_s.strategies:
            np.testing.assert_array_equal(from_s.confusion[level][s], from_d.confusion[level][s])


def test_training_split_is_refused(store):
    with pytest.raises(StoreError, match="no full-resolution labels to score against"):
        from_store(SoftStore(store), ["nn"], "train")


def test_cli_tables_and_files(store, tmp_path):
    out = tmp_path / "reports"  # missing: made (it once ended the scoring with a traceback)
    args = ["fidelity", "--store", store, "--compare", "nn", "--json", str(out / "f.json"),
            "--csv", str(out / "f.csv"), "--plot", str(out / "plots" / "f.png")]  # fmt: skip
    r = CliRunner().invoke(app, expand_multi_value(args, MULTI_VALUE, app))
    assert r.exit_code == 0, r.output
    assert "1/8: IoU (%) at full resolution" in r.output
    doc = json.loads((out / "f.json").read_text())
    assert {row["strategy"] for row in doc["summary"]} == {"soft", "soft-argmax", "nn"}
    assert (out / "plots/f.png").read_bytes()[:4] == b"\x89PNG"
    assert "optimistic" not in r.output
    r = CliRunner().invoke(app, ["fidelity", "--store", store, "--decode", "prior"])
    assert r.exit_code == 0 and "fitted on the split it is scored on (val)" in r.output
    for command in ("fidelity", "priors"):  # dataset options beside a store: refused, they
        # were ignored (--scales 1/8 scored every level)
        r = CliRunner().invoke(app, [command, "--store", store, "--scales", "1/8",
                                     "--no-antialias"])  # fmt: skip
        said = " ".join(r.output.split())
        assert r.exit_code == 2
        assert "--scales, --no-antialias: for computing from a dataset" in said
        assert "IoU" not in said and "D =" not in said
        r = CliRunner().invoke(app, [command, "--store", store, "--version", "gtFine"])
        assert r.exit_code == 2 and "--version: for computing from a dataset" in r.output
    # the defaults given are refused as well: the store's levels may be others
    r = CliRunner().invoke(app, ["priors", "--store", store, "--scales", "1/8", "--scales",
                                 "1/4", "--scales", "1/2", "--kernel", "bilinear"])  # fmt: skip
    assert r.exit_code == 2 and "--scales, --kernel: for computing from a dataset" in r.output


@pytest.mark.slow  # 2-6 s: keeps the fast tier under a minute
def test_cli_decodes_fitted_on_val_scored_on_camvid_test(camvid_store, tmp_path):
    args = ["fidelity", "--store", camvid_store, "--compare", "nn", "--decode", "all",
            "--fit-split", "val", "--split", "test", "--json", str(tmp_path / "f.json"),
            "--csv", str(tmp_path / "f.csv"), "--plot", str(tmp_path / "f.png")]  # fmt: skip
    r = CliRunner().invoke(app, expand_multi_value(args, MULTI_VALUE, app))
    assert r.exit_code == 0, r.output
    assert "1/8 soft-bias (fitted on val)" in r.output and "Pole" in r.output
    doc = json.loads((tmp_path / "f.json").read_text())
    assert doc["split"] == "test" and doc["images"] == 2
    assert {row["strategy"] for row in doc["summary"]} == {
        "soft",
        "soft-argmax",
        "soft-prior",
        "soft-bias",
        "nn",
    }
    for level in ("1/8", "1/4"):
        prior, bias = (
            Decode.from_dict(doc["decodes"][level][s]) for s in ("soft-prior", "soft-bias")
        )
        assert (prior.kind, bias.kind, bias.fitted_on) == ("prior", "bias", "val")
        assert len(bias.bias) == 11 and prior.tau is not None
    fitted_val = from_store(
        SoftStore(camvid_store), ["nn"], "val", decodes=["bias"], fit_split="val"
    )
    for level in fitted_val.levels:  # its fit split: not below the argmax (seeded sample)
        assert fitted_val.miou(level, "soft-bias") >= fitted_val.miou(level, "soft") - 1e-9
    with pytest.raises(ValueError, match="unknown decodes"):
        from_store(SoftStore(camvid_store), [], "test", decodes=["temperature"])
