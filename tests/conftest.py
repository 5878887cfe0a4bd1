"""Shared fixtures: generated sample datasets and the real-format files in ../shared."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from softprep.manifest import load_manifest
from softprep.sample import write_sample

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
FACTS = SHARED / "datasets"

FIXTURES_ABSENT = (
    "../shared/fixtures absent: real-format dataset files are not in the repository; "
    "see README, section Two commands (the shared/ folder)"
)
FACTS_ABSENT = (
    "../shared/datasets absent: the class tables of the real datasets are not in the "
    "repository; see README, section Two commands (the shared/ folder)"
)
# pytest imports readline at start-up, and GNU readline exports the terminal's size
# (COLUMNS=80, LINES) into the process's C environment, unseen by os.environ: every CLI the
# tests spawn inherited it and wrapped its messages at 80 columns, which no user's log does.
for _name in ("COLUMNS", "LINES"):
    if _name not in os.environ:
        os.unsetenv(_name)

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=FIXTURES_ABSENT)
needs_facts = pytest.mark.skipif(not FACTS.is_dir(), reason=FACTS_ABSENT)
# where softprep's CLI forks its workers (softprep.build._may_fork): Linux, Python >= 3.10.5
needs_fork = pytest.mark.skipif(
    not sys.platform.startswith("linux") or sys.version_info < (3, 10, 5),
    reason="softprep forks its workers only on Linux, Python 3.10.5 and later",
)


@pytest.fixture(scope="session")
def samples(tmp_path_factory):
    """Sample dataset roots: {"cityscapes": Path, "mapillary-v1.2": ..., "ade20k": ...}."""
    base = tmp_path_factory.mktemp("samples")
    roots = {}
    for key, name, version in [
        ("cityscapes", "cityscapes", None),
        ("mapillary-v1.2", "mapillary", "v1.2"),
        ("mapillary-v2.0", "mapillary", "v2.0"),
        ("ade20k", "ade20k", None),
    ]:
        roots[key] = base / key
        write_sample(load_manifest(name, version), roots[key], {"train": 4, "val": 2}, seed=1)
    return roots


@pytest.fixture(scope="session")
def cityscapes():
    return load_manifest("cityscapes")
