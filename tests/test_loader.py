"""softtrain loader: crops equal the stored level, flips, padding, densify, determinism."""

import itertools

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from softprep.build import BuildOptions, build
from softprep.datasets import decode_label
from softprep.manifest import load_manifest
from softprep.planes import decode_planes
from softprep.store import StoreError
from softtrain.data import CropDataset, EvalDataset, densify, multi_class_mask
from softtrain.loader import RunSampler


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("loader") / "ade.zarr")
    build(load_manifest("ade20k"), samples["ade20k"], url, BuildOptions(scales=(0.25, 0.5)))
    return url


def direct_read(url, scale_name, i, y0, x0, h, w):
    root = zarr.open_group(url, mode="r")
    planes = root[f"levels/{scale_name}/soft"][i, :, y0 : y0 + h, x0 : x0 + w]
    rgb = root[f"levels/{scale_name}/rgb"][i, y0 : y0 + h, x0 : x0 + w]
    index, prob = decode_planes(planes)
    return index, prob, rgb


def test_crops_match_a_direct_zarr_read_with_flips(store):
    data = CropDataset(store, (48, 64), "train", flip=True, seed=3)
    flips = set()
    for item in range(len(data)):
        for epoch in range(3):
            s = data[epoch * len(data) + item]
            y0, x0 = s["origin"].tolist()
            name = "x0.25" if s["scale"] == 0.25 else "x0.5"
            index, prob, rgb = direct_read(store, name, s["item"], y0, x0, 48, 64)
            got_i, got_p, got_rgb = (
                s["index"].numpy(),
                s["prob"].numpy(),
                s["image"].numpy().transpose(1, 2, 0),
            )
            if s["flipped"]:
                index, prob, rgb = index[..., ::-1], prob[..., ::-1], rgb[:, ::-1]
            flips.add(s["flipped"])
            np.testing.assert_array_equal(got_i, index)
            np.testing.assert_array_equal(got_p, prob)
            np.testing.assert_array_equal(got_rgb, rgb)
    assert flips == {True, False}


def test_padding_is_void_and_black(store):
    data = CropDataset(store, (200, 300), "train", levels=["1/4"], flip=False)
    s = data[0]
    h, w = data.hw[0.25][s["item"]]
    assert h < 200 and w < 300
    assert (s["index"][0, h:, :] == 255).all() and (s["prob"][0, h:, :] == 255).all()
    assert (s["index"][0, :, w:] == 255).all() and (s["image"][:, h:, :] == 0).all()
    probs, void = densify(s["index"][None], s["prob"][None], 150)
    assert torch.allclose(void[0, h:, :], torch.ones(1))


def test_a_flipped_padded_crop_is_the_mirror_of_the_unflipped_one(store):
    """Padding of a flipped crop lies on the left: the same window without the flip, mirrored."""
    kept = CropDataset(store, (200, 300), "train", levels=["1/4"], flip=False, seed=5)
    flips = CropDataset(store, (200, 300), "train", levels=["1/4"], flip=True, seed=5)
    flipped = 0
    for i in range(2 * len(kept)):
        a, b = kept[i], flips[i]
        assert a["origin"].tolist() == b["origin"].tolist()
        mirror = (lambda t: t.flip(-1)) if b["flipped"] else (lambda t: t)
        for key in ("image", "index", "prob"):
            assert torch.equal(b[key], mirror(a[key])), key
        flipped += b["flipped"]
    assert 0 < flipped < 2 * len(kept)


def test_densify_sums_to_one_and_mc_mask(store):
    data = CropDataset(store, (48, 64), "train")
    batch = next(iter(DataLoader(data, batch_size=4)))
    probs, void = densify(batch["index"], batch["prob"], 150)
    assert probs.shape == (4, 150, 48, 64)
    torch.testing.assert_close(probs.sum(1) + void, torch.ones(4, 48, 64))
    mc = multi_class_mask(batch["index"], batch["prob"])
    nonvoid_classes = (probs > 0).sum(1)
    assert torch.equal(mc, nonvoid_classes > 1)


def test_deterministic_across_worker_counts_and_each_image_once(store):
    data = CropDataset(store, (32, 32), "train", seed=7)

    def epoch(workers):  # the second epoch of a run
        sampler = RunSampler(len(data), 2, seed=7, start=len(data) // 2)
        loader = DataLoader(data, batch_size=2, num_workers=workers, sampler=sampler)
        return list(itertools.islice(loader, len(data) // 2))

    a, b = epoch(0), epoch(2)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
    items = sorted(int(i) for batch in b for i in batch["item"])
    assert items == sorted(data.items.tolist())


def test_eval_reader_has_full_resolution_labels(store, samples):
    from softprep.store import SoftStore

    st = SoftStore(store)
    ev = EvalDataset(store, "1/2", "val")
    s = ev[0]
    i = s["index"]
    assert st.split_of()[i] == "val"
    assert tuple(s["label"].shape) == tuple(st.root["images/hw"][i])
    assert tuple(s["image"].shape[1:]) == tuple(st.hw(0.5)[i])
    stem = str(st.names()[i]).split("/", 1)[1]
    source = samples["ade20k"] / f"ADEChallengeData2016/annotations/validation/{stem}.png"
    expected = decode_label(source, load_manifest("ade20k"))  # independent: the source file
    np.testing.assert_array_equal(s["label"].numpy(), expected)


def test_errors(store, tmp_path):
    with pytest.raises(StoreError, match="no level 1/8"):
        CropDataset(store, (32, 32), levels=["1/8"])
    with pytest.raises(StoreError, match="larger than images at every level"):
        CropDataset(store, (1000, 1000), pad=False)
    root = zarr.open_group(store, mode="r+")
    root["images/done"][0] = False
    try:
        with pytest.raises(StoreError, match="not built"):
            CropDataset(store, (32, 32))
    finally:
        root["images/done"][0] = True


class KeyRecorder(zarr.storage.WrapperStore):
    """Records the keys (and byte ranges) read from the wrapped store."""

    reads: list

    async def get(self, key, prototype, byte_range=None):
        self.reads.append((key, byte_range))
        return await self._store.get(key, prototype, byte_range)


def test_crop_reads_only_the_chunks_it_touches(tmp_path):
    from softprep.sample import write_sample
    from softprep.store import SoftStore

    m = load_manifest("cityscapes")
    write_sample(m, tmp_path / "cs", {"train": 1, "val": 0}, size=(512, 1024))
    url = str(tmp_path / "cs.zarr")
    build(m, tmp_path / "cs", url, BuildOptions(scales=(1.0,), images_per_shard=1))
    recorder = KeyRecorder(zarr.storage.LocalStore(url, read_only=True))
    recorder.reads = []
    store = SoftStore(recorder)
    soft_data = "levels/x1/soft/c."
    for window, chunks in [((10, 10, 50, 50), 1), ((200, 200, 100, 100), 4), ((0, 0, 256, 512), 2)]:
        recorder.reads.clear()
        store.read_soft(1.0, 0, window)
        data = [r for r in recorder.reads if r[0].startswith(soft_data)]
        assert len(data) == 1 + chunks  # the shard index, then each 256x256 chunk touched
        assert all(r[1] is not None for r in data)  # byte ranges, never the whole shard
    recorder.reads.clear()
    store.read_soft(1.0, 0)  # the whole image, alone in its shard: the shard in one read
    assert [r[1] for r in recorder.reads if r[0].startswith(soft_data)] == [None]
    store.read_rgb(1.0, 0, (0, 0, 8, 8))
    recorder.reads.clear()
    store.read_soft(1.0, 0, (10, 10, 50, 50))
    store.read_rgb(1.0, 0, (10, 10, 50, 50))
    assert not [r for r in recorder.reads if r[0].endswith("zarr.json")]  # arrays opened once


def test_cat_max_ratio_prefers_crops_without_a_dominant_class(store):
    def dominant_share(data, n=24):
        shares = []
        for idx in range(n):
            hard = data[idx]["index"][0]
            hard = hard[hard != 255]
            shares.append(np.bincount(hard.numpy()).max() / hard.numel())
        return np.array(shares)

    plain = dominant_share(CropDataset(store, (24, 24), "train", seed=5))
    balanced = dominant_share(CropDataset(store, (24, 24), "train", seed=5, cat_max_ratio=0.75))
    assert (plain >= 0.75).sum() > (balanced >= 0.75).sum()
