"""What the wheel declares: licence, authors, classifiers, typed packages."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_licence_authors_classifiers_and_py_typed():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert "MIT License" in (REPO / "LICENSE").read_text()
    assert project["authors"] == [{"name": "softprep developers"}]
    assert "Typing :: Typed" in project["classifiers"]
    for package in ("softprep", "softtrain"):
        assert (REPO / package / "py.typed").is_file()  # in the wheel with its package
