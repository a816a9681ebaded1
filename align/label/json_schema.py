"""A documented subset of JSON Schema, so rules can check JSON answers without a new dependency.

Supported keywords: ``type`` (a name or a list of names: object, array, string,
number, integer, boolean, null), ``enum``, ``const``, ``properties``,
``required``, ``additionalProperties`` (true/false or a schema), ``items`` (one
schema), ``minItems``/``maxItems``, ``minLength``/``maxLength``, ``pattern``,
``minimum``/``maximum``, ``anyOf``; the annotations ``$schema``, ``$id``,
``title``, ``description``, ``examples`` and ``default`` are ignored. Any other
keyword is refused when the rules file is loaded, rather than silently not
checked.
"""

from __future__ import annotations

import re
from typing import Any

SUPPORTED = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems",
             "maxItems", "minLength", "maxLength", "pattern", "minimum", "maximum", "anyOf"}
ANNOTATIONS = {"$schema", "$id", "title", "description", "examples", "default"}
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def unsupported_keywords(schema: Any, path: str = "$") -> list[str]:
    """Where the schema uses something this subset would not check (empty when all is supported)."""
    if not isinstance(schema, dict):
        return [f"{path}: a schema must be an object, got {type(schema).__name__}"]
    found = [f"{path}: unsupported keyword '{k}'" for k in schema if k not in SUPPORTED | ANNOTATIONS]
    types = schema.get("type")
    for name in ([types] if isinstance(types, str) else types or []):
        if name not in _TYPES:
            found.append(f"{path}: unknown type '{name}'")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except re.error as exc:
            found.append(f"{path}: bad pattern ({exc})")
    for key, sub in (schema.get("properties") or {}).items():
        found += unsupported_keywords(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        found += unsupported_keywords(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += unsupported_keywords(schema["additionalProperties"], f"{path}.*")
    for i, sub in enumerate(schema.get("anyOf") or []):
        found += unsupported_keywords(sub, f"{path}.anyOf[{i}]")
    return found


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"object": dict, "array": list, "string": str, "boolean": bool,
                              "null": type(None)}[name])


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema`` (empty list: it conforms)."""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, n) for n in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}")
    if "anyOf" in schema and all(schema_errors(value, s, path) for s in schema["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    if isinstance(value, dict):
        errors += [f"{path}: missing required key '{k}'" for k in schema.get("required", []) if k not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected key '{key}'")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{path}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match pattern {schema['pattern']!r}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: below minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: above maximum {schema['maximum']}")
    return errors
