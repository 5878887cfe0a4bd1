"""Dataset manifests: the data-driven part of a dataset (classes, label values, file layout).

A manifest is a JSON file (see ``manifests/`` at the repository root; every field is
described in ``docs/manifests.md`` and ``manifests/schema.json``). Fields:

- ``dataset``, ``version``, ``description``
- ``classes``: ``[{"id": train_id, "name": str, "color": [r, g, b]}]``, train ids 0..C-1
- ``ignore_index``: the train id of void/ignore (255)
- ``label_values``: raw label-file value -> train id (``ignore_index`` for void); a value
  missing from the map is invalid, or ``"identity"`` for files that already hold train ids
- ``splits``: split name -> directory token substituted for ``{split}`` in the layout
- ``eval_splits``: splits whose full-resolution labels are kept for evaluation
- ``image_only_splits`` (optional): splits released without labels (Cityscapes
  ``train_extra``, Mapillary ``testing``): built only when named (``--splits``), their
  images stored with all-void labels, the unlabelled images of semi-supervised training
- ``layout``: ``images``/``labels`` directories (with ``{split}``) and the
  ``image_suffix``/``label_suffix`` that pair files by their common stem
- ``variants`` (optional): named overrides of ``layout`` fields and ``label_values``; a
  ``void_class`` {name, color} entry makes the values mapped to void one more class
- ``config_json`` (optional): the dataset's own class config file, checked against the manifest
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

VOID = 255


REQUIRED = ("dataset", "classes", "label_values", "splits", "layout")
FIELDS = REQUIRED + (  # every field; manifests/schema.json and docs/manifests.md say more
    "version",
    "default_version",
    "description",
    "ignore_index",
    "eval_splits",
    "image_only_splits",
    "variants",
    "config_json",
)


class ManifestError(ValueError):
    """A manifest that cannot be found or does not make sense."""


def manifest_dirs() -> list[Path]:
    """Where built-in manifests live: the repository's ``manifests/`` or the installed copy."""
    here = Path(__file__).resolve().parent
    return [p for p in (here.parent / "manifests", here / "_manifests") if p.is_dir()]


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Manifest:
    dataset: str
    version: str
    description: str
    classes: tuple[ClassInfo, ...]
    label_values: dict[int, int]
    splits: dict[str, str]
    eval_splits: tuple[str, ...]
    layout: dict[str, str]
    image_only_splits: tuple[str, ...] = ()
    ignore_index: int = VOID
    config_json: str | None = None
    variant: str | None = None
    source: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def palette(self) -> np.ndarray:
        """(C, 3) uint8 class colours, indexed by train id."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    @cached_property
    def lookup_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Raw value -> train id as a (65536,) uint8 table and a (65536,) bool validity mask
        (built once per manifest)."""
        lut = np.full(65536, VOID, dtype=np.uint8)
        valid = np.zeros(65536, dtype=bool)
        for raw, tid in self.label_values.items():
            lut[raw] = VOID if tid == self.ignore_index else tid
            valid[raw] = True
        return lut, valid

    def __getstate__(self) -> dict:
        """Pickled without the cached lookup table (128 KiB; rebuilt on use), so build
        tasks stay small whatever the parent decoded before."""
        return {k: v for k, v in self.__dict__.items() if k != "lookup_table"}

    def raw_value_of(self, train_id: int) -> int:
        """The first raw label value that maps to ``train_id`` (``VOID`` for void)."""
        target = self.ignore_index if train_id == VOID else train_id
        for raw, tid in sorted(self.label_values.items()):
            if tid == target:
                return raw
        raise ManifestError(f"{self.source}: no raw label value maps to train id {train_id}")

    def to_json(self) -> dict:
        """The manifest as it was loaded, with the chosen variant applied."""
        return {**self.raw, "variant": self.variant}


def _inside_root(value: str) -> bool:
    """A layout path or split token that stays inside the dataset root."""
    parts = Path(value.replace("{split}", "x")).parts
    return not Path(value).is_absolute() and ".." not in parts


def _validate(raw: dict, source: str, known_fields: bool = True) -> None:
    """Every problem of a raw manifest at once, as one ``ManifestError`` naming the file;
    ``known_fields``: refuse a field not in ``FIELDS`` (a misspelt one) too."""
    problems = [f"missing field '{k}'" for k in REQUIRED if k not in raw]
    for key in sorted(set(raw) - set(FIELDS) if known_fields else ()):
        close = difflib.get_close_matches(key, FIELDS, n=1)
        problems.append(
            f"unknown field '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
        )
    classes = raw.get("classes", [])
    if not isinstance(classes, list):
        problems.append(
            f"'classes' must be a list of {{id, name, color}}, got {type(classes).__name__}"
        )
        classes = []
    for n, c in enumerate(classes):
        if not isinstance(c, dict):
            problems.append(f"classes[{n}] must be an object {{id, name, color}}")
            continue
        missing = [k for k in ("id", "name", "color") if k not in c]
        if missing:
            problems.append(f"classes[{n}] ({c.get('name', '?')}) has no {', '.join(missing)}")
        color = c.get("color", [0, 0, 0])
        if not (
            isinstance(color, list)
            and len(color) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
        ):
            problems.append(
                f"classes[{n}] ({c.get('name', '?')}): color must be [r, g, b] in 0..255"
            )
    values = raw.get("label_values", {})
    if values != "identity":
        if not isinstance(values, dict):
            problems.append(
                "'label_values' must be an object {raw value: train id} or \"identity\""
            )
            values = {}
        for key, tid in values.items():
            if not (str(key).isdigit() and int(key) <= 65535):
                problems.append(f"label_values key '{key}' must be an integer in 0..65535")
            if not isinstance(tid, int):
                problems.append(f"label_values['{key}'] = {tid!r} must be an integer train id")
    splits = raw.get("splits", {})
    if not isinstance(splits, dict) or not splits:
        problems.append("'splits' must be a non-empty object {split: folder token}")
        splits = {}
    for name, token in splits.items():
        if not isinstance(token, str) or not _inside_root(token):
            problems.append(
                f"split '{name}': token {token!r} must be a relative path inside the root"
            )
    for key in ("eval_splits", "image_only_splits"):
        unknown = [s for s in raw.get(key, []) if s not in splits]
        if unknown:
            problems.append(f"'{key}' names splits not in 'splits': {unknown}")
    both = set(raw.get("eval_splits", [])) & set(raw.get("image_only_splits", []))
    if both:
        problems.append(f"splits {sorted(both)} cannot be evaluated: they are image-only")
    layout = raw.get("layout", {})
    if not isinstance(layout, dict):
        problems.append("'layout' must be an object")
        layout = {}
    for key in ("images", "labels"):
        if key in layout and (not isinstance(layout[key], str) or not _inside_root(layout[key])):
            problems.append(
                f"layout '{key}' = {layout[key]!r} must be a relative path inside the root (no '..')"
            )
    if problems:
        raise ManifestError(f"{source}: " + "; ".join(problems))


def _parse(raw: dict, source: str, variant: str | None, known_fields: bool = True) -> Manifest:
    _validate(raw, source, known_fields)
    layout = dict(raw["layout"])
    values = raw["label_values"]
    void_class = None
    if variant is not None:
        variants = raw.get("variants", {})
        if variant not in variants:
            raise ManifestError(
                f"{source}: no label variant '{variant}'; known: {sorted(variants) or 'none'}"
            )
        override = dict(variants[variant])
        values = override.pop("label_values", values)
        void_class = override.pop("void_class", None)
        layout.update(override)
        _validate(
            raw | {"layout": layout, "label_values": values},
            f"{source} (variant {variant})",
            known_fields,
        )
    classes = tuple(
        ClassInfo(int(c["id"]), str(c["name"]), tuple(int(v) for v in c["color"]))
        for c in raw["classes"]
    )
    if [c.id for c in classes] != list(range(len(classes))):
        raise ManifestError(f"{source}: class ids must be 0..C-1 in order")
    if not 0 < len(classes) < VOID:
        raise ManifestError(f"{source}: need 1..254 classes, got {len(classes)}")
    ignore = int(raw.get("ignore_index", VOID))
    if values == "identity":
        label_values = {c.id: c.id for c in classes} | {ignore: ignore}
    else:
        label_values = {int(k): int(v) for k, v in values.items()}
    if void_class is not None:  # what is void becomes one more class (mmseg's tables)
        classes += (ClassInfo(len(classes), str(void_class["name"]), tuple(void_class["color"])),)
        label_values = {k: len(classes) - 1 if v == ignore else v for k, v in label_values.items()}
    bad = {k: v for k, v in label_values.items() if v != ignore and not 0 <= v < len(classes)}
    if bad:
        raise ManifestError(f"{source}: label_values map to unknown train ids: {bad}")
    for key in ("images", "labels", "image_suffix", "label_suffix"):
        if key not in layout:
            raise ManifestError(f"{source}: layout is missing '{key}'")
    return Manifest(
        dataset=str(raw["dataset"]),
        version=str(raw.get("version", "")),
        description=str(raw.get("description", "")),
        classes=classes,
        label_values=label_values,
        splits=dict(raw["splits"]),
        eval_splits=tuple(raw.get("eval_splits", ())),
        layout=layout,
        image_only_splits=tuple(raw.get("image_only_splits", ())),
        ignore_index=ignore,
        config_json=raw.get("config_json"),
        variant=variant,
        source=source,
        raw=raw,
    )


def manifest_from_json(raw: dict, source: str) -> Manifest:
    """A manifest from ``Manifest.to_json()`` output (as a store or checkpoint records it)."""
    raw = dict(raw)
    variant = raw.pop("variant", None)
    return _parse(raw, source, variant, known_fields=False)  # stores keep what they recorded


def same_labels(a: dict, b: dict) -> bool:
    """Whether two recorded manifests (``Manifest.to_json()``) read labels alike: the same
    classes (ids and names), raw label values and void value; descriptions, colours and
    the rest aside."""

    def key(raw: dict) -> tuple:
        m = manifest_from_json(raw, "a store's manifest")
        return [(c.id, c.name) for c in m.classes], m.label_values, m.ignore_index

    return key(a) == key(b)


def available() -> list[dict]:
    """Every built-in manifest as its raw dict, with ``path``."""
    found = []
    for d in manifest_dirs():
        for p in sorted(d.glob("*.json")):
            raw = json.loads(p.read_text())
            if "dataset" in raw:  # schema.json documents the fields
                found.append(raw | {"path": str(p)})
    return found


def load_manifest(name: str, version: str | None = None, variant: str | None = None) -> Manifest:
    """A manifest by dataset name (``cityscapes``, ``mapillary``, ``ade20k``), optionally a
    version (``v2.0``), or by the path of a user-written JSON file (the ``folder`` dataset)."""
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise ManifestError(f"{path}: manifest file not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from e
        return _parse(raw, str(path), variant)
    candidates = [m for m in available() if m["dataset"] == name.lower()]
    if not candidates:
        known = sorted({m["dataset"] for m in available()})
        close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ManifestError(
            f"unknown dataset '{name}'; {hint}known: {', '.join(known)}, or a path to a "
            "manifest .json"
        )
    name = name.lower()
    if version is not None:
        candidates = [m for m in candidates if m.get("version") == version]
        if not candidates:
            versions = sorted(m.get("version", "") for m in available() if m["dataset"] == name)
            raise ManifestError(f"{name}: no version '{version}'; known: {', '.join(versions)}")
    elif len(candidates) > 1:
        candidates = [m for m in candidates if m.get("default_version")] or candidates[:1]
    raw = dict(candidates[0])
    return _parse(raw, raw.pop("path"), variant)
