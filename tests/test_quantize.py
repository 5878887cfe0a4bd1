"""Top-K exact-sum quantisation."""

import numpy as np

from softprep.quantize import decode_planes, encode_planes


def quantize_probs(p):
    """(K, N) proportions -> (K, N) uint8 through the store's encoder (float32 inside)."""
    k, n = p.shape
    ids = np.zeros((k, 1, n), np.uint8)
    planes, _ = encode_planes(ids, p.reshape(k, 1, n).astype(np.float32))
    return decode_planes(planes)[1].reshape(k, n)


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
    q = quantize_probs(p)
    assert (q.sum(axis=0, dtype=int) == 255).all()
    assert np.abs(q - p * 255).max() < 1.0
    assert (q[:-1] >= q[1:]).all()  # order kept: slot 0 is the argmax


def test_largest_remainder_is_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    p = random_probs(rng, 3, 200, zeros=False)
    q = quantize_probs(p).astype(int)
    p = p.astype(np.float32).astype(np.float64)  # what the encoder rounds
    for j in range(p.shape[1]):
        x = p[:, j] / p[:, j].sum() * 255
        best = min(
            (np.abs(np.array([a, b, 255 - a - b]) - x).max(), (a, b))
            for a in range(int(x[0]) - 1, int(x[0]) + 3)
            for b in range(int(x[1]) - 1, int(x[1]) + 3)
        )
        assert np.abs(q[:, j] - x).max() <= best[0] + 1e-12


def test_truncated_mass_is_renormalised():
    q = quantize_probs(np.array([[0.5], [0.3]]))  # 0.2 truncated
    assert q[:, 0].tolist() == [159, 96]  # 255 * 5/8 = 159.4, 255 * 3/8 = 95.6


def test_planes_roundtrip():
    rng = np.random.default_rng(2)
    p = random_probs(rng, 6, 40 * 30).reshape(6, 40, 30).astype(np.float32)
    idx = rng.integers(0, 19, (6, 40, 30)).astype(np.uint8)
    planes, mass = encode_planes(idx, p)
    assert planes.shape == (11, 40, 30) and planes.dtype == np.uint8
    i2, q = decode_planes(planes)
    assert (i2 == idx).all() and (q.sum(axis=0, dtype=int) == 255).all()
    assert np.abs(q / 255 - p).max() < 1 / 255
    # the mass each id holds in the planes, against summing them independently
    expected = np.zeros(256)
    np.add.at(expected, i2.ravel(), q.ravel() / 255)
    np.testing.assert_allclose(mass, expected, rtol=0, atol=1e-9)


def test_planes_of_one_class_pixels_need_no_probabilities():
    idx = np.zeros((3, 2, 2), np.uint8)
    idx[0] = [[4, 7], [7, 7]]
    p = np.zeros((3, 2, 2), np.float32)
    p[0] = 1.0
    planes, mass = encode_planes(idx, p)
    assert (planes[3:] == 0).all() and (decode_planes(planes)[1][0] == 255).all()
    assert mass[4] == 1.0 and mass[7] == 3.0 and mass.sum() == 4.0
