"""Training crops and evaluation images from a ``softprep`` store, with no resampling.

Scale augmentation picks one of the store's levels per sample (uniformly, or with
``level_weights``); a crop is then read from that level, which reads only the chunks it
touches. For finer scale steps, build more levels (``softprep build --scales 1/4 0.3
0.375 1/2 ...``): every level is a real, paired down-sampling of the full-resolution data.

Samples carry the top-K soft label as stored (ids + uint8 probabilities); turn them into
dense class probabilities on the device with ``densify`` (measured 4x faster overall than
densifying in loader workers).

Class-balanced crops follow mmsegmentation's ``cat_max_ratio``: up to 10 crop positions
are tried and the first whose most frequent (argmax, non-void) class covers less than
``cat_max_ratio`` of the crop is kept (``1.0`` = off).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import Dataset

from softprep.manifest import VOID
from softprep.options import build_command
from softprep.planes import TOTAL
from softprep.store import (
    FULL_LABEL,
    SoftStore,
    StoreError,
    parse_scale,
    repair_hint,
    scale_label,
)

CAT_MAX_TRIES = 10
MEAN = torch.tensor([0.485, 0.456, 0.406]) * 255  # ImageNet statistics, 0..255 units
STD = torch.tensor([0.229, 0.224, 0.225]) * 255


def normalise(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 normalised with ImageNet statistics (on its device)."""
    mean, std = MEAN.to(image.device).view(1, 3, 1, 1), STD.to(image.device).view(1, 3, 1, 1)
    return (image.float() - mean) / std


def open_checked(url: str, split: str | list[str]) -> tuple[SoftStore, np.ndarray]:
    """The store and the indices of its finished images of ``split`` (a name, several, or
    ``all`` for every split). Refuses an incomplete store (images neither built nor skipped
    by ``--on-error skip``: finish the build) and finished images whose shards are missing."""
    store = SoftStore(url)
    done = store.done()
    skipped = {s["index"] for s in store.meta.get("skipped", []) if s.get("index") is not None}
    missing = [i for i in np.flatnonzero(~done) if i not in skipped]
    if missing:
        raise StoreError(
            f"{url}: {len(missing)} image(s) not built; finish the build: "
            f"{build_command(store.meta, url)}"
        )
    wanted = store.splits if split == "all" else [split] if isinstance(split, str) else split
    for name in wanted:
        if name not in store.splits:
            raise StoreError(f"{url}: no split '{name}'; splits: {', '.join(store.splits)}")
    in_split = np.isin(store.split_of(), wanted)
    items = np.flatnonzero(done & in_split)
    evaluated = np.isin(store.split_of(), store.meta.get("eval_splits", []))
    for path in store.image_arrays():
        wanted = items[evaluated[items]] if path == FULL_LABEL else items
        lost = store.missing_shards(path, wanted)
        if len(lost):
            raise StoreError(
                f"{url}: {len(lost)} finished image(s) have no data in {path} (e.g. "
                f"{store.names()[lost[0]]}), missing shards: the store is damaged; "
                f"{repair_hint(url)}"
            )
    return store, items


class _LazyStore:
    """Opens the store on first use in each process (zarr resets its IO loop after fork)."""

    def __init__(self, url: str):
        self.url = url
        self._store: SoftStore | None = None

    def __getstate__(self):
        return {"url": self.url, "_store": None}

    @property
    def store(self) -> SoftStore:
        if self._store is None:
            self._store = SoftStore(self.url)
        return self._store


class CropDataset(Dataset):
    """Random training crops of a split (or several).

    Item ``i`` (one image per index; an epoch visits each image once) is a dict:
    ``image`` (3, h, w) uint8, ``index`` (K, h, w) uint8 class ids (255 = void),
    ``prob`` (K, h, w) uint8 summing to 255 (neither in a ``subset(labels=False)``),
    ``scale`` float, and where it came from: ``item`` (image number in the store),
    ``origin`` (y0, x0) in the level, ``flipped``, ``size`` (h', w') of the image inside
    the crop. Crops larger than the level are padded
    at the bottom/right (left once flipped) with void and black: ``valid_mask``.

    Randomness (level, crop position, flip):
    - ``seed=None`` (default, for any sampler, e.g. ``DataLoader(shuffle=True)``): drawn
      from torch's generator, which the DataLoader reseeds in every worker every epoch, so
      every epoch sees new crops; ``torch.manual_seed`` makes a run repeatable.
    - ``seed=S`` (what ``softtrain fit`` uses): from (S, epoch, i) alone, independent of the
      worker count; indices past the split's length select later epochs
      (``epoch * len(self) + i``, as ``softtrain.loader.RunSampler`` draws them).
    """

    def __init__(
        self,
        url: str,
        crop: tuple[int, int],
        split: str | list[str] = "train",
        levels: list[str] | None = None,
        level_weights: list[float] | None = None,
        flip: bool = True,
        pad: bool = True,
        cat_max_ratio: float = 1.0,
        seed: int | None = None,
    ):
        store, self.items = open_checked(url, split)
        self.lazy = _LazyStore(url)
        self.crop = crop
        self.scales = [parse_scale(s) for s in levels] if levels else store.scales
        for s in self.scales:
            store.level(s)  # a clear error for a level the store lacks
        weights = np.asarray(level_weights or [1.0] * len(self.scales), dtype=np.float64)
        if len(weights) != len(self.scales) or (weights < 0).any() or weights.sum() == 0:
            raise ValueError("level_weights: one non-negative weight per level")
        self.weights = weights / weights.sum()
        self.hw = {s: store.hw(s) for s in self.scales}
        if not pad:
            fits = [s for s in self.scales if (self.hw[s][self.items] >= crop).all()]
            if not fits:
                raise StoreError(
                    f"{url}: crop {crop[0]}x{crop[1]} is larger than images at every level "
                    f"({', '.join(scale_label(s) for s in self.scales)}); allow padding or "
                    "use a smaller crop"
                )
            if len(fits) < len(self.scales):
                raise StoreError(
                    f"{url}: crop {crop[0]}x{crop[1]} is larger than some images at level(s) "
                    f"{', '.join(scale_label(s) for s in self.scales if s not in fits)}; "
                    "allow padding or leave those levels out"
                )
        self.flip, self.cat_max_ratio, self.seed = flip, cat_max_ratio, seed
        self.k = store.k
        self.labels = True  # items carry index/prob (``subset(..., labels=False)``: not)

    def __len__(self) -> int:
        return len(self.items)

    def padding_share(self) -> dict[float, float]:
        """Per level: the mean share of a crop that is padding (void), over this dataset's
        images (a crop larger than the image at that level is padded)."""
        ch, cw = self.crop
        shares = {}
        for s in self.scales:
            hw = self.hw[s][self.items]
            inside = np.minimum(hw[:, 0], ch) * np.minimum(hw[:, 1], cw) / (ch * cw)
            shares[s] = float(1 - inside.mean()) if len(hw) else 0.0
        return shares

    def padding_note(self, above: float = 0.05) -> str | None:
        """A sentence naming the levels where more than ``above`` of a crop is padding, or
        None (``softtrain fit`` and ``bench-loader`` print it)."""
        padded = {s: v for s, v in self.padding_share().items() if v > above}
        if not padded:
            return None
        return (
            "the crop is larger than the images at "
            + ", ".join(f"{scale_label(s)} ({v:.0%} of each crop is void padding)"
                        for s, v in padded.items())
            + "; a smaller --crop trains faster on the same pixels"
        )  # fmt: skip

    def subset(self, items: np.ndarray, seed: int | None, labels: bool = True) -> CropDataset:
        """The same crops restricted to store images ``items`` (e.g. the labelled share),
        with their own ``seed``; the store is not checked again. ``labels=False`` (the
        unlabelled share): items hold no ``index``/``prob``, and no label is read, not even
        to place the crop (``cat_max_ratio`` is off)."""
        other = copy.copy(self)
        other.items, other.seed = np.intersect1d(self.items, items), seed
        if not labels:
            other.labels, other.cat_max_ratio = False, 1.0
        return other

    def _window(self, rng, hw):
        """A crop window (y0, x0, h, w) inside an image of size ``hw``."""
        ch, cw = self.crop
        h, w = min(ch, hw[0]), min(cw, hw[1])
        return int(rng.integers(0, hw[0] - h + 1)), int(rng.integers(0, hw[1] - w + 1)), h, w

    def _balanced(self, index: np.ndarray) -> bool:
        if self.cat_max_ratio >= 1.0:
            return True
        hard = index[0][(index[0] != VOID)]
        if hard.size == 0:
            return True
        counts = np.bincount(hard)
        return counts.max() / hard.size < self.cat_max_ratio and len(counts.nonzero()[0]) > 1

    def __getitem__(self, index: int) -> dict:
        epoch, item = divmod(index, len(self.items))
        if self.seed is None:
            rng = np.random.default_rng(int(torch.randint(2**62, ())))
        else:
            rng = np.random.default_rng([self.seed, epoch, item])
        i = int(self.items[item])
        scale = self.scales[rng.choice(len(self.scales), p=self.weights)]
        store = self.lazy.store
        hw = self.hw[scale][i]
        window = self._window(rng, hw)
        if self.labels:
            index, prob = store.read_soft(scale, i, window)
            for _ in range(CAT_MAX_TRIES - 1):
                if self._balanced(index):
                    break
                window = self._window(rng, hw)
                index, prob = store.read_soft(scale, i, window)
        image = store.read_rgb(scale, i, window)
        ch, cw = self.crop
        flipped = bool(self.flip and rng.random() < 0.5)
        out = {
            "image": _padded(image.transpose(2, 0, 1), (ch, cw), 0, flipped),
            "scale": scale,
            "item": i,  # image number in the store
            "origin": torch.tensor(window[:2]),  # (y0, x0) of the crop in the level
            "flipped": flipped,
            "size": torch.tensor(window[2:]),  # (h', w') of the image in the crop
        }
        if not self.labels:
            return out
        # padding is void: slot 0 holds VOID with all the mass
        out["index"] = _padded(index, (ch, cw), VOID, flipped)
        out["prob"] = _padded(prob, (ch, cw), TOTAL, flipped)
        return out


def _padded(a: np.ndarray, crop: tuple[int, int], first: int, flipped: bool) -> torch.Tensor:
    """(C, h, w) uint8 -> (C, *crop) uint8 tensor: ``a`` at the top left, zeros elsewhere
    (``first`` in channel 0), mirrored left-right if ``flipped``."""
    out = np.zeros((a.shape[0], *crop), dtype=np.uint8)
    out[0] = first
    h, w = a.shape[1:]
    if flipped:  # written mirrored: one copy
        out[:, :h, crop[1] - w :] = a[..., ::-1]
    else:
        out[:, :h, :w] = a
    return torch.from_numpy(out)


def valid_mask(size: torch.Tensor, flipped: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) bool on ``size``'s device: True on image pixels, False on the padding of
    crops larger than their image. ``size`` (B, 2) and ``flipped`` (B,) bool are a
    ``CropDataset`` batch's; ``hw`` is its crop (h, w)."""
    h, w = hw
    rows = torch.arange(h, device=size.device)[None, :, None] < size[:, 0, None, None]
    cols = torch.arange(w, device=size.device)[None, None, :] < size[:, 1, None, None]
    flipped = torch.as_tensor(flipped, device=size.device)[:, None, None]
    cols = torch.where(flipped, cols.flip(-1), cols)
    return rows & cols


class EvalDataset(Dataset):
    """Whole images of an evaluation split at one or more levels, with full-resolution labels.

    ``levels``: one level, or several (the first is the main one; the others serve
    multi-scale test-time augmentation). Item: ``image`` (3, h, w) uint8 at the main level,
    ``images`` the list of (3, h, w) uint8 at every level, ``label`` (H, W) int64
    full-resolution train ids (255 = void), ``index`` (item number in the store).
    """

    def __init__(self, url: str, levels: str | float | list, split: str = "val"):
        store, self.items = open_checked(url, split)
        if not store.has_full_labels:
            raise StoreError(f"{url}: no full-resolution labels; evaluation needs an eval split")
        levels = levels if isinstance(levels, (list, tuple)) else [levels]
        for level in levels:
            store.level(level)
        self.scales = [parse_scale(level) for level in levels]
        self.scale = self.scales[0]
        self.lazy = _LazyStore(url)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> dict:
        store, i = self.lazy.store, int(self.items[item])
        images = [
            torch.from_numpy(np.ascontiguousarray(store.read_rgb(s, i).transpose(2, 0, 1)))
            for s in self.scales
        ]
        return {
            "image": images[0],
            "images": images,
            "label": torch.from_numpy(store.read_full_label(i).astype(np.int64)),
            "index": i,
        }


def check_class_ids(index: torch.Tensor, prob: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` if a class id with mass is ``>= num_classes``: the model was built
    for fewer classes than the store has. One device synchronisation."""
    present = torch.where((index == VOID) | (prob == 0), 0, index)
    top = int(present.amax()) if present.numel() else 0
    if top >= num_classes:
        raise ValueError(
            f"the soft labels hold class id {top}, but {num_classes} classes were given (the "
            "logits' channels): build the model with the store's class count"
        )


def densify(index: torch.Tensor, prob: torch.Tensor, num_classes: int):
    """Top-K to dense, on whatever device the tensors are on.

    ``index``, ``prob``: (B, K, H, W) uint8 (ids, 255 = void; probabilities summing to 255).
    Returns ``probs`` (B, C, H, W) float32 class probabilities and ``void`` (B, H, W)
    float32 void mass; ``probs.sum(1) + void == 1``. Checked with ``check_class_ids``.
    """
    check_class_ids(index, prob, num_classes)
    idx = index.long()
    idx = torch.where(idx == VOID, num_classes, idx)
    b, _, h, w = idx.shape
    dense = torch.zeros((b, num_classes + 1, h, w), dtype=torch.float32, device=idx.device)
    dense.scatter_add_(1, idx, prob.float() / TOTAL)
    return dense[:, :num_classes], dense[:, num_classes]


def multi_class_mask(index: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: pixels with more than one non-void class of non-zero mass."""
    return ((index != VOID) & (prob > 0)).sum(dim=1) > 1


def hard_label(index: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64 majority-vote label: slot 0 (the argmax), 255 where that is void."""
    return index[:, 0].long()
