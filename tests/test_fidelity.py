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
from softprep.fidelity import from_dataset, from_store, soft_bilinear_argmax
from softprep.manifest import VOID, load_manifest
from softprep.store import SoftStore, StoreError
from softprep.terminal import expand_multi_value

CS = load_manifest("cityscapes")


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("fid") / "cs.zarr")
    build(CS, samples["cityscapes"], url, BuildOptions(scales=(0.125, 0.3, 1.0)))
    return url


def dense_reference(index: np.ndarray, prob: np.ndarray, hw, c: int) -> np.ndarray:
    """torch: densify, bilinear up-sampling (align_corners=False), argmax over classes."""
    ids = torch.from_numpy(np.where(index == VOID, c, index).astype(np.int64))[None]
    dense = torch.zeros((1, c + 1, *index.shape[1:]), dtype=torch.float64)
    dense.scatter_add_(1, ids, torch.from_numpy(prob.astype(np.float64))[None])
    up = F.interpolate(dense[:, :c], size=hw, mode="bilinear", align_corners=False)[0]
    return torch.where(up.amax(0) > 0, up.argmax(0), VOID).numpy().astype(np.uint8)


def test_sparse_bilinear_argmax_equals_the_dense_reference(store):
    s = SoftStore(store)
    for scale in (0.125, 0.3):
        for i in range(len(s)):
            index, prob = s.read_soft(scale, i)
            hw = tuple(int(v) for v in s.root["images/hw"][i])
            ours = soft_bilinear_argmax(index, prob, hw)
            reference = dense_reference(index, prob, hw, s.num_classes)
            assert (ours != reference).mean() < 1e-4, (scale, i)  # float ties only


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
    args = ["fidelity", "--store", store, "--compare", "nn", "--json", str(tmp_path / "f.json"),
            "--csv", str(tmp_path / "f.csv"), "--plot", str(tmp_path / "f.png")]  # fmt: skip
    r = CliRunner().invoke(app, expand_multi_value(args, MULTI_VALUE, app))
    assert r.exit_code == 0, r.output
    assert "1/8: IoU (%) at full resolution" in r.output
    doc = json.loads((tmp_path / "f.json").read_text())
    assert {row["strategy"] for row in doc["summary"]} == {"soft", "soft-argmax", "nn"}
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
