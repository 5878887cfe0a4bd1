"""Decodes: each equals a dense numpy reference, the one-pass bias search equals a brute
force over its grid, a fitted decode never scores its fit split below the argmax, and a
fitted decode survives a JSON round trip."""

import json

import numpy as np
import pytest

from softprep.decode import (
    BIAS_GRID,
    TAUS,
    Decode,
    DecodeSample,
    _best_bias,
    argmax_decode,
    fit_decode,
    miou,
    prior_decode,
)
from softprep.manifest import VOID

C = 5


def probabilities(rng, shape=(C, 24, 32), sparsity=0.6) -> np.ndarray:
    """(C, H, W) float32 probabilities, most pixels holding 1-3 classes, some none."""
    p = rng.random(shape) ** 3 * (rng.random(shape) > sparsity)
    p[:, :2, :3] = 0  # void only
    total = p.sum(0, keepdims=True)
    return np.divide(p, total, out=np.zeros_like(p), where=total > 0).astype(np.float32)


def truth_of(probs, rng) -> np.ndarray:
    """(H, W) uint8 truth: a class drawn from each pixel's probabilities, some void."""
    cum = np.cumsum(probs, 0)
    y = (cum < rng.random(probs.shape[1:])[None] * cum[-1]).sum(0).clip(0, C - 1)
    y = np.where(cum[-1] > 0, y, rng.integers(0, C, y.shape))
    y[-1] = VOID
    return y.astype(np.uint8)


def reference(probs: np.ndarray, bias) -> np.ndarray:
    """Dense numpy: argmax over classes of log p + b, first class on ties, void where all 0."""
    with np.errstate(divide="ignore"):
        scores = np.log(probs.astype(np.float64)) + np.asarray(bias)[:, None, None]
    out = np.full(probs.shape[1:], VOID, np.uint8)
    for y, x in np.ndindex(*probs.shape[1:]):
        if probs[:, y, x].max() > 0:
            out[y, x] = int(np.argmax(scores[:, y, x]))
    return out


def reference_confusion(truth, labels) -> np.ndarray:
    conf = np.zeros((C, C + 1))
    for t, p in zip(truth.ravel(), labels.ravel()):
        if t != VOID:
            conf[t, C if p == VOID else p] += 1
    return conf


@pytest.mark.parametrize("bias", [(0.0,) * C, (0.5, -1.0, 2.0, 0.0, -0.3)])
def test_apply_equals_the_dense_reference(bias):
    probs = probabilities(np.random.default_rng(0))
    ours = Decode("bias", bias).apply(probs)
    np.testing.assert_array_equal(ours, reference(probs, bias))
    assert (ours == VOID).sum() >= 6  # the void-only corner, and pixels drawn empty


def test_prior_with_tau_zero_is_the_argmax():
    probs = probabilities(np.random.default_rng(1))
    prior = np.array([0.5, 0.3, 0.0, 0.15, 0.05])
    d = prior_decode(prior, 0.0)
    np.testing.assert_array_equal(d.weights, np.ones(C))
    np.testing.assert_array_equal(d.apply(probs), argmax_decode(C).apply(probs))
    np.testing.assert_array_equal(d.apply(probs), probs.argmax(0) * (probs.max(0) > 0)
                                  + VOID * (probs.max(0) == 0))  # fmt: skip
    # a rare class gains: its offset is the largest; an absent one gets the rarest's
    b = prior_decode(prior, 0.5).bias
    assert np.argmax(b) in (2, 4) and b[2] == b[4]


def sample_of(seed, images=3, max_pixels=None):
    rng = np.random.default_rng(seed)
    s = DecodeSample(C, max_pixels, seed)
    for _ in range(images):
        p = probabilities(rng)
        s.add(p, truth_of(p, rng))
    return s, rng


def test_sample_confusion_equals_the_reference():
    rng = np.random.default_rng(2)
    s = DecodeSample(C)
    expected = np.zeros((C, C + 1))
    bias = (0.2, -0.4, 1.0, 0.0, 0.0)
    for _ in range(2):
        p = probabilities(rng)
        y = truth_of(p, rng)
        s.add(p, y)
        expected += reference_confusion(y, reference(p, bias))
    np.testing.assert_array_equal(s.confusion(Decode("bias", bias)), expected)
    sub = sample_of(2, images=2, max_pixels=50)[0]
    assert sub.confusion(argmax_decode(C)).sum() == pytest.approx(expected.sum())


def test_one_pass_bias_search_equals_brute_force():
    s, rng = sample_of(3)
    p, y, w = s.arrays()
    with np.errstate(divide="ignore"):
        logp = np.log(p.astype(np.float64))
    bias = rng.normal(0, 0.5, C).round(1)
    for k in range(C):
        picked = _best_bias(logp, y, w, bias, k, s.fixed)
        exact = []
        for g in BIAS_GRID:
            trial = bias.copy()
            trial[k] = g
            exact.append(miou(s.confusion(Decode("bias", tuple(trial)))))
        trial = bias.copy()
        trial[k] = picked
        assert miou(s.confusion(Decode("bias", tuple(trial)))) == pytest.approx(max(exact))


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_fitted_decodes_never_lower_the_fit_splits_miou(seed):
    s, _ = sample_of(seed)
    base = miou(s.confusion(argmax_decode(C)))
    prior = fit_decode(s, "prior", "val")
    bias = fit_decode(s, "bias", "val")
    assert prior.tau in TAUS and bias.fitted_on == "val"
    assert miou(s.confusion(prior)) >= base
    assert miou(s.confusion(bias)) > base  # these scenes always leave something to win


def test_decode_round_trips_through_json():
    s, _ = sample_of(7)
    for kind in ("argmax", "prior", "bias"):
        d = fit_decode(s, kind, "val")
        back = Decode.from_dict(json.loads(json.dumps(d.to_dict())))
        assert back == d and back.to_dict()["kind"] == kind
    with pytest.raises(ValueError, match="unknown decode"):
        fit_decode(s, "temperature")
