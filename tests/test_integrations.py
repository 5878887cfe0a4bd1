"""The public API inside other stacks: the README example as written, a PyTorch Lightning
DataModule + LightningModule pair, epoch-varying crops with any sampler, the class-count
refusal, and the store read by xarray and dask without this project."""

import re
import runpy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import softprep
import softtrain
from softprep import BuildOptions, SoftStore, build_store, load_manifest
from tests.conftest import REPO


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("api") / "cs.zarr")
    build_store(
        load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.125, 0.25))
    )
    return url


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert re.fullmatch(r"mIoU \d+\.\d%, aAcc \d+\.\d%\n", printed), printed


def test_public_names_resolve_and_import_lightly():
    for name in softprep.__all__:
        assert getattr(softprep, name) is not None
    for name in softtrain.__all__:
        assert getattr(softtrain, name) is not None
    with pytest.raises(AttributeError):
        softtrain.no_such_thing  # noqa: B018
    import subprocess
    import sys

    code = "import sys, softprep, softtrain; sys.exit(bool({'torch', 'zarr'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # exports load on use


def test_read_probs_equals_densify(store):
    s = SoftStore(store)
    index, prob = s.read_soft("1/8", 1)
    probs, void = s.read_probs("1/8", 1)
    dense, dense_void = softtrain.densify(
        torch.from_numpy(index)[None], torch.from_numpy(prob)[None], s.num_classes
    )
    np.testing.assert_allclose(probs, dense[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(void, dense_void[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(probs.sum(0) + void, 1, atol=1e-5)


def test_crops_differ_across_epochs_with_a_plain_shuffling_loader(store):
    crops = softtrain.CropDataset(store, (16, 32), "train")

    def epoch(workers):
        seen = {}
        loader = DataLoader(crops, batch_size=2, shuffle=True, num_workers=workers)
        for batch in loader:
            for i, y, x, f, sc in zip(
                batch["item"], *batch["origin"].T, batch["flipped"], batch["scale"]
            ):
                seen[int(i)] = (int(y), int(x), bool(f), float(sc))
        return seen

    for workers in (0, 2):
        torch.manual_seed(0)
        first, second = epoch(workers), epoch(workers)
        assert first.keys() == second.keys() and first != second
        torch.manual_seed(0)
        assert epoch(workers) == first  # torch.manual_seed repeats a run


def test_fewer_logit_channels_than_store_classes_is_refused(store):
    batch = next(iter(DataLoader(softtrain.CropDataset(store, (32, 64), "train"), batch_size=4)))
    assert int(batch["index"][batch["index"] != 255].max()) == 18  # class 18 present
    for loss in ("soft", "ce-hard"):
        with pytest.raises(ValueError, match="class id 18, but 18 classes were given"):
            softtrain.soft_label_loss(
                torch.randn(4, 18, 32, 64), batch["index"], batch["prob"], loss
            )
    with pytest.raises(ValueError, match="upsample the logits"):
        softtrain.soft_label_loss(torch.randn(4, 19, 8, 16), batch["index"], batch["prob"])


@pytest.mark.slow
def test_lightning_datamodule_and_module(store, tmp_path):
    L = pytest.importorskip("lightning")

    class SoftLabelData(L.LightningDataModule):
        def __init__(self, url, crop=(32, 64), batch_size=4):
            super().__init__()
            self.url, self.crop, self.batch_size = url, crop, batch_size

        def setup(self, stage=None):
            self.train = softtrain.CropDataset(self.url, self.crop, "train", levels=["1/8"])
            self.val = softtrain.EvalDataset(self.url, "1/8", "val")

        def train_dataloader(self):
            return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

        def val_dataloader(self):
            return DataLoader(self.val, batch_size=1)

    class SoftLabelSegmenter(L.LightningModule):
        def __init__(self, num_classes):
            super().__init__()
            self.model = softtrain.build_model("deeplabv3plus_r18", num_classes)
            self.confusion = softtrain.Confusion(num_classes)
            self.losses = []

        def training_step(self, batch, _):
            logits = self.model(softtrain.normalise(batch["image"]))
            logits = F.interpolate(logits, batch["index"].shape[-2:], mode="bilinear")
            out = softtrain.soft_label_loss(logits, batch["index"], batch["prob"])
            self.losses.append(out.loss.item())
            self.log("kl", out.kl)
            return out.loss

        def validation_step(self, batch, _):
            logits = self.model(softtrain.normalise(batch["image"]))
            logits = F.interpolate(logits, batch["label"].shape[-2:], mode="bilinear")
            self.confusion.update(logits.argmax(1), batch["label"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)

    torch.manual_seed(0)
    module = SoftLabelSegmenter(SoftStore(store).num_classes)
    trainer = L.Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, SoftLabelData(store))
    assert np.mean(module.losses[-5:]) < 0.7 * np.mean(module.losses[:5])
    assert module.confusion.labelled_pixels() > 0 and 0 <= module.confusion.miou() <= 1


def test_xarray_and_dask_read_the_store_with_named_dimensions(store):
    xr = pytest.importorskip("xarray")
    da = pytest.importorskip("dask.array")
    s = SoftStore(store)
    for scale in s.scales:
        level = s.level_path(scale)
        ds = xr.open_zarr(store, group=level, consolidated=False)
        assert ds["soft"].dims == ("image", "plane", "y", "x")
        assert ds["rgb"].dims == ("image", "y", "x", "channel")
        assert "slot 0's probability is 255 minus" in ds["soft"].attrs["description"]
        h, w = s.hw(scale)[2]
        np.testing.assert_array_equal(
            ds["rgb"].isel(image=2, y=slice(0, h), x=slice(0, w)).values, s.read_rgb(scale, 2)
        )
        planes = da.from_zarr(store, component=f"{level}/soft")[2, :, :h, :w].compute()
        index, _ = s.read_soft(scale, 2)
        np.testing.assert_array_equal(planes[: s.k], index)
    meta = s.meta["multiscales"][0]
    assert [a["name"] for a in meta["axes"]] == ["image", "plane", "y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"][-1] for d in meta["datasets"]]
    assert scales == sorted(scales)  # finest level (smallest step) first


def test_stores_of_the_previous_format_read_and_unknown_formats_are_refused(store, tmp_path):
    import shutil

    import zarr

    from softprep import StoreError

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    root = zarr.open_group(str(copy), mode="r+")
    meta = dict(root.attrs["softprep"])
    root.attrs["softprep"] = meta | {"format": "softprep-store/1"}
    assert SoftStore(str(copy)).read_rgb("1/8", 0).shape[-1] == 3
    root.attrs["softprep"] = meta | {"format": "softprep-store/9", "softprep_version": "9.0"}
    with pytest.raises(StoreError, match="store format 'softprep-store/9' \\(softprep 9.0\\)"):
        SoftStore(str(copy))
