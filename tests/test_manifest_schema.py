"""manifests/schema.json: every built-in manifest conforms, and it names the fields that
softprep.manifest checks. jsonschema is not a dependency: a validator of the keywords the
schema uses is below (softprep itself validates with the checks in softprep/manifest.py)."""

import json
import re
from pathlib import Path

import pytest

from softprep.manifest import FIELDS, REQUIRED, ManifestError, available, load_manifest

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "manifests" / "schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text())
TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "boolean": bool,
}


def problems(value, schema, where="$") -> list[str]:
    """What ``value`` breaks of ``schema`` (the keywords schema.json uses)."""
    if "$ref" in schema:
        node = SCHEMA
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return problems(value, node, where)
    found = []
    t = schema.get("type")
    if t and not (isinstance(value, TYPES[t]) and not (t == "integer" and isinstance(value, bool))):
        return [f"{where}: not {t}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{where}: not {schema['const']!r}")
    if "oneOf" in schema and sum(not problems(value, s, where) for s in schema["oneOf"]) != 1:
        found.append(f"{where}: matches not exactly one of oneOf")
    if "not" in schema and not problems(value, schema["not"], where):
        found.append(f"{where}: matches 'not'")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        found.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if "minimum" in schema and value < schema["minimum"]:
        found.append(f"{where}: below {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        found.append(f"{where}: above {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1e9):
            found.append(f"{where}: {len(value)} items")
        for i, item in enumerate(value):
            found += problems(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, dict):
        found += [f"{where}: no {k}" for k in schema.get("required", []) if k not in value]
        if len(value) < schema.get("minProperties", 0):
            found.append(f"{where}: too few properties")
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for k, v in value.items():
            if "propertyNames" in schema:
                found += problems(k, schema["propertyNames"], f"{where} key {k}")
            if k in props:
                found += problems(v, props[k], f"{where}.{k}")
            elif extra is False:
                found.append(f"{where}: unknown {k}")
            elif isinstance(extra, dict):
                found += problems(v, extra, f"{where}.{k}")
    return found


def test_the_validator_catches_what_the_schema_forbids():
    good = {k: v for k, v in available()[0].items() if k != "path"}
    assert problems(good, SCHEMA) == []
    assert problems(good | {"eval_split": []}, SCHEMA) == ["$: unknown eval_split"]
    assert problems(good | {"splits": {"train": "../x"}}, SCHEMA)
    assert problems(good | {"label_values": {"a": 1}}, SCHEMA)
    assert problems(good | {"classes": [{"id": 0, "name": "x", "color": [0, 0]}]}, SCHEMA)


@pytest.mark.parametrize("raw", available(), ids=lambda m: Path(m["path"]).stem)
def test_every_built_in_manifest_conforms_to_the_schema(raw):
    raw = {k: v for k, v in raw.items() if k != "path"}
    assert problems(raw, SCHEMA) == []


def test_the_schema_names_the_fields_softprep_checks():
    assert set(SCHEMA["properties"]) == set(FIELDS)
    assert SCHEMA["required"] == list(REQUIRED)


def test_an_unknown_field_is_refused_with_a_suggestion(tmp_path):
    raw = json.loads(Path(available()[0]["path"]).read_text())
    raw["eval_split"] = raw.pop("eval_splits")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(
        ManifestError, match="unknown field 'eval_split' \\(did you mean 'eval_splits'"
    ):
        load_manifest(str(path))
