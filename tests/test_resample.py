"""Kernels and soft labels against dense references: torch.nn.functional.interpolate and
PIL per class channel, on odd sizes and non-integer factors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from softprep.manifest import VOID
from softprep.planes import decode_planes
from softprep.resample import KERNELS, Resampler, axis_weights, output_size

SIZES = [
    ((37, 53), (9, 13)),
    ((64, 96), (8, 12)),
    ((50, 70), (25, 35)),
    ((101, 77), (13, 29)),
    ((30, 40), (45, 61)),
]
TORCH_MODE = {
    "nearest": "nearest-exact",
    "nearest-floor": "nearest",
    "area": "area",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
}
PIL_FILTER = {"area": Image.BOX, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def torch_reference(x: np.ndarray, out_hw, kernel, antialias):
    """(H, W, C) float64 -> (Ho, Wo, C) with torch's own kernel."""
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    mode = TORCH_MODE[kernel]
    kw = dict(antialias=antialias, align_corners=False) if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(t, size=out_hw, mode=mode, **kw)[0].permute(1, 2, 0).numpy()


def pil_reference(x: np.ndarray, out_hw, kernel):
    """(H, W, C) float -> (Ho, Wo, C): PIL resize of each channel as a float image."""
    return np.stack(
        [
            np.asarray(
                Image.fromarray(x[..., c].astype(np.float32), "F").resize(
                    out_hw[::-1], PIL_FILTER[kernel]
                )
            )
            for c in range(x.shape[2])
        ],
        axis=-1,
    )


def reference(x, out_hw, kernel, antialias):
    """Our kernels are PIL's when antialiased (area = PIL BOX) and torch's otherwise; nearest
    is torch's (PIL's float32 coordinates round exact ties, e.g. 30 -> 45 px, differently)."""
    if antialias and kernel in ("area", "bilinear", "bicubic"):
        return pil_reference(x, out_hw, kernel)
    return torch_reference(x, out_hw, kernel, antialias)


def one_hot(label: np.ndarray) -> np.ndarray:
    return (label[..., None] == np.arange(256)).astype(np.float64)


def random_label(hw, classes, rng):
    """Blocky label with thin lines and isolated pixels, void included."""
    lab = (
        rng.choice(classes, size=(hw[0] // 4 + 1, hw[1] // 4 + 1))
        .repeat(4, 0)
        .repeat(4, 1)[: hw[0], : hw[1]]
    )
    lab = lab.copy()
    lab[:, rng.integers(0, hw[1], 3)] = classes[0]
    lab[rng.integers(0, hw[0], 20), rng.integers(0, hw[1], 20)] = VOID
    return lab.astype(np.uint8)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_weights_match_reference(kernel, antialias, in_hw, out_hw):
    rng = np.random.default_rng(0)
    x = rng.random((*in_hw, 2))
    ours = Resampler.make(in_hw, out_hw, kernel, antialias).resample_float(x)
    np.testing.assert_allclose(ours, reference(x, out_hw, kernel, antialias), atol=2e-6)


def stored_proportions(planes: np.ndarray) -> np.ndarray:
    """(2K-1, Ho, Wo) store planes -> (Ho, Wo, 256) float64 proportions, by class id."""
    index, q = decode_planes(planes)
    out = np.zeros((*planes.shape[1:], 256))
    for k in range(index.shape[0]):
        np.add.at(out, (*np.indices(planes.shape[1:]), index[k]), q[k] / 255)
    return out


def dense_soft(label, out_hw, kernel, antialias):
    """(Ho, Wo, 256) float64: the one-hot label resampled by the reference, lobes clipped."""
    dense = np.clip(reference(one_hot(label), out_hw, kernel, antialias), 0, None)
    return dense / dense.sum(-1, keepdims=True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_soft_labels_match_dense_one_hot_reference(kernel, antialias, in_hw, out_hw):
    rng = np.random.default_rng(1)
    label = random_label(in_hw, np.array([0, 3, 7, 11, 18]), rng)
    r = Resampler.make(in_hw, out_hw, kernel, antialias)
    planes, mass, truncated = r.soft_planes(label, k=6)
    ours = stored_proportions(planes)
    # largest-remainder rounding: every class within one unit (1/255) of the reference
    # (plus the float32 reference's own error)
    assert np.abs(ours - dense_soft(label, out_hw, kernel, antialias)).max() < 1.001 / 255
    np.testing.assert_allclose(mass, ours.sum((0, 1)), rtol=0, atol=1e-9)
    assert (truncated == 0).all()  # 5 classes fit in K = 6: nothing dropped, exactly
    q = decode_planes(planes)[1]
    assert (q[:-1] >= q[1:]).all()  # slot 0 is the argmax


def test_truncation_is_accounted():
    """More classes per pixel than K: the dropped mass is reported, the kept mass is the top."""
    label = np.arange(64, dtype=np.uint8).reshape(8, 8) % 10
    r = Resampler.make((8, 8), (1, 1), "area")
    planes, _, truncated = r.soft_planes(label, k=3)
    index, q = decode_planes(planes)
    counts = np.bincount(label.ravel(), minlength=10) / 64
    top = np.sort(counts)[::-1][:3]
    assert np.abs(q[:, 0, 0] - 255 * top / top.sum()).max() < 1
    np.testing.assert_allclose(truncated[0, 0], 1 - top.sum(), atol=1e-7)
    assert set(index[:, 0, 0]) <= set(np.flatnonzero(counts == counts.max()))


@pytest.mark.parametrize("kernel", ["area", "bilinear", "bicubic"])
def test_tied_classes_rank_lower_id_first(kernel):
    """Two classes of exactly equal proportion (by the dense reference): the lower id is
    slot 0, whatever order the kernel summed the tap weights in. Stripes 9 9 9 9 4 4 4 4
    under x8 windows centred on the stripes' edges: each tap of 9 is mirrored by one of 4
    (away from the borders)."""
    label = np.where((np.arange(64) // 4) % 2 == 0, 9, 4).astype(np.uint8)
    label = np.broadcast_to(label, (64, 64))
    r = Resampler.make((64, 64), (8, 8), kernel, True)
    index, q = decode_planes(r.soft_planes(label, k=2)[0])
    dense = dense_soft(label, (8, 8), kernel, True)
    tied = np.abs(dense[..., 4] - dense[..., 9]) < 1e-6
    assert tied.sum() > 0
    assert (index[0][tied] == 4).all() and (index[1][tied] == 9).all()
    # 127.5 units each: the tie's extra unit goes to slot 0, which stays the argmax
    assert (q[0][tied] == 128).all() and (q[1][tied] == 127).all()


@pytest.mark.parametrize("kernel", ["area", "bilinear", "bicubic"])
def test_colour_is_the_same_kernel_as_pil(kernel):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    r = Resampler.make((61, 83), (17, 23), kernel, True)
    ours = r.colour(img).astype(int)
    exact = r.resample_float(img.astype(np.float64))
    assert np.abs(ours - np.clip(exact, 0, 255)).max() <= 1.0  # PIL's fixed point rounding


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("antialias", [True, False])
def test_class_mass_equals_sum_of_dense_soft_label(kernel, antialias):
    rng = np.random.default_rng(3)
    label = random_label((45, 67), np.array([1, 2, 5]), rng)
    r = Resampler.make(label.shape, (11, 19), kernel, antialias)
    dense = r.resample_float(one_hot(label)).sum(axis=(0, 1))
    np.testing.assert_allclose(r.class_mass(label), dense, atol=1e-9)


def test_output_size_rounds_half_up_and_nearest_phases():
    assert (
        output_size(1024, 1 / 8) == 128
        and output_size(375, 0.5) == 188
        and output_size(3, 0.1) == 1
    )
    centre = axis_weights(16, 2, "nearest").index[:, 0]
    floor = axis_weights(16, 2, "nearest-floor").index[:, 0]
    assert list(centre) == [4, 12] and list(floor) == [0, 8]  # shifted by (f - 1) / 2 ~ 4 px


@pytest.mark.parametrize("width", [1, 3, 4, 7, 33])
def test_map_counted_equals_numpy_for_every_width(width):
    """The four-histogram kernel against ``lut[raw]`` and ``np.bincount``: widths below,
    at and off a multiple of four, runs of one value and every value present."""
    from softprep import kernels

    rng = np.random.default_rng(width)
    raw = rng.integers(0, 256, (5, width), dtype=np.uint8)
    raw[1] = 7  # a run of one value
    lut = rng.permutation(256).astype(np.uint8)
    label, counts = kernels.map_counted(raw, lut)
    np.testing.assert_array_equal(label, lut[raw])
    np.testing.assert_array_equal(counts, np.bincount(raw.ravel(), minlength=256))


@pytest.mark.parametrize("width", [1, 3, 4, 7, 33])
def test_sampled_counts_equals_numpy_for_every_width(width):
    """The four-histogram nearest-grid count against ``np.bincount(label[yi][:, xi])``,
    with repeated and unordered indices."""
    from softprep import kernels

    rng = np.random.default_rng(width)
    label = rng.integers(0, 256, (9, 40), dtype=np.uint8)
    label[2] = 3  # a run of one value
    yi = rng.integers(0, 9, 6)
    xi = rng.integers(0, 40, width)
    expected = np.bincount(label[yi][:, xi].ravel(), minlength=256)
    np.testing.assert_array_equal(kernels.sampled_counts(label, yi, xi), expected)


def test_change_counts_equal_numpy_cumulative_sums():
    """The running 2-D change counts against numpy: a summed-area table of the row changes
    left of each pixel, and running counts of each column's changes from the row above."""
    from softprep.resample import change_counts

    rng = np.random.default_rng(4)
    label = rng.integers(0, 3, (7, 9), dtype=np.uint8)
    label[2] = 5  # a row of one label
    left = np.zeros(label.shape, np.int64)
    left[:, 1:] = np.cumsum(label[:, 1:] != label[:, :-1], axis=1)
    above = np.zeros(label.shape, np.int64)
    above[1:] = label[1:] != label[:-1]
    across, down = change_counts(label)
    zero = np.zeros((1, 9), np.int64)
    np.testing.assert_array_equal(across, np.vstack([zero, np.cumsum(left, axis=0)]) % 2**16)
    np.testing.assert_array_equal(down, np.vstack([zero, np.cumsum(above, axis=0)]) % 2**16)


def assert_matches_dense(label, out_hw, classes):
    """Stored soft labels (bilinear, antialiased) within one unit of the dense reference."""
    r = Resampler.make(label.shape, out_hw, "bilinear", True)
    ours = stored_proportions(r.soft_planes(label, k=4)[0])[..., classes]
    dense = reference((label[..., None] == classes).astype(np.float64), out_hw, "bilinear", True)
    assert np.abs(ours - dense / dense.sum(-1, keepdims=True)).max() < 1.001 / 255


def test_soft_labels_exact_where_change_counts_wrap():
    """The change counts are kept modulo 2**16: a label with more changes than that (its
    noisy top rows) above one-label regions, against the dense reference."""
    rng = np.random.default_rng(5)
    label = random_label((160, 1024), np.array([0, 3, 7]), rng)
    label[:140] = rng.choice(np.array([0, 3], np.uint8), (140, 1024))  # ~71,500 changes
    assert_matches_dense(label, (40, 256), np.array([0, 3, 7, VOID]))


def test_soft_labels_exact_in_a_window_of_2_to_the_16_changes():
    """A window of more than 2**16 pixels holding exactly 2**16 changes (256 identical rows
    of 256 changes each) reads as zero changes modulo 2**16: such windows must not be
    decided by the counts."""
    row = np.zeros(300, np.uint8)
    row[1:257:2] = 3  # 256 changes
    label = np.tile(row, (256, 1))
    assert_matches_dense(label, (1, 1), np.array([0, 3]))
