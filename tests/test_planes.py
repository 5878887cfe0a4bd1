"""Top-K exact-sum quantisation, as the soft-label kernel stores it."""

import numpy as np

from softprep import kernels
from softprep.planes import TOTAL, decode_planes
from softprep.resample import Resampler, change_counts


def quantize_probs(p, k=None):
    """(M, N) proportions -> (K, N) ids and uint8 proportions as the store rounds them
    (``k`` = M by default): pixel n is one output pixel whose M taps, labels 0..M-1 along
    one row, carry the weights ``p[:, n]``."""
    m, n = p.shape
    label = np.tile(np.arange(m, dtype=np.uint8), n)[None]  # (1, M*N)
    yi, yw = np.zeros((1, 1), np.int64), np.ones((1, 1))
    xi, xw = np.arange(m * n).reshape(n, m), np.ascontiguousarray(p.T, np.float64)
    planes, _, _ = kernels.soft_planes(label, *change_counts(label), yi, yw, xi, xw, k or m, TOTAL)
    index, q = decode_planes(planes)
    return index[:, 0], q[:, 0]


def random_probs(rng, k, n, zeros=True):
    p = rng.random((k, n)) ** 3
    if zeros:
        p[rng.random((k, n)) < 0.4] = 0
    p[0] += 1e-3
    p = -np.sort(-p, axis=0)
    return p / p.sum(axis=0)


def test_sums_to_255_and_error_below_one_unit():
    rng = np.random.default_rng(0)
    p = random_probs(rng, 6, 100_000)
    index, q = quantize_probs(p)
    assert (q.sum(axis=0, dtype=int) == 255).all()
    assert np.abs(q - p * 255).max() < 1.0
    assert (q[:-1] >= q[1:]).all()  # order kept: slot 0 is the argmax
    assert (index[p > 0] == np.indices(p.shape)[0][p > 0]).all()  # each with its label


def test_largest_remainder_is_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    p = random_probs(rng, 3, 200, zeros=False)
    q = quantize_probs(p)[1].astype(int)
    for j in range(p.shape[1]):
        x = p[:, j] / p[:, j].sum() * 255
        best = min(
            (np.abs(np.array([a, b, 255 - a - b]) - x).max(), (a, b))
            for a in range(int(x[0]) - 1, int(x[0]) + 3)
            for b in range(int(x[1]) - 1, int(x[1]) + 3)
        )
        assert np.abs(q[:, j] - x).max() <= best[0] + 1e-9


def test_truncated_mass_is_renormalised():
    index, q = quantize_probs(np.array([[0.5], [0.3], [0.2]]), k=2)  # 0.2 truncated
    assert index[:, 0].tolist() == [0, 1]
    assert q[:, 0].tolist() == [159, 96]  # 255 * 5/8 = 159.4, 255 * 3/8 = 95.6


def test_planes_hold_the_mass_they_report():
    rng = np.random.default_rng(2)
    label = rng.integers(0, 19, (160, 120)).astype(np.uint8)
    label[:80] = 7  # a region of one class
    planes, mass, _ = Resampler.make(label.shape, (40, 30), "bilinear").soft_planes(label, 6)
    assert planes.shape == (11, 40, 30) and planes.dtype == np.uint8
    index, q = decode_planes(planes)
    assert (q.sum(axis=0, dtype=int) == 255).all()
    # the mass each id holds in the planes, against summing them independently
    expected = np.zeros(256)
    np.add.at(expected, index.ravel(), q.ravel() / 255)
    np.testing.assert_allclose(mass, expected, rtol=0, atol=1e-9)
    # pixels of one class need no probabilities: slot 0 holds all 255
    assert (planes[6:, :18] == 0).all() and (index[0, :18] == 7).all()
    assert (planes[6:, 22:] != 0).any(axis=0).all()  # random labels: mixed everywhere
