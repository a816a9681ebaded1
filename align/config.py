"""Typed configs from YAML files plus ``key=value`` overrides, with errors that point at the line.

Every stage config is a pydantic model with ``extra="forbid"``: a misspelt key
is an error that names the file, the line and the closest valid key, not a
setting silently ignored.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from align.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


class StrictConfig(BaseModel):
    """Base for stage configs: unknown keys are errors; values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def text_or_file(value: str | None, what: str) -> str | None:
    """A setting given as text, or as ``@path`` to read it from a file (stripped); None for unset or empty.

    ``what`` names the setting in errors ("system prompt file prompts/sys.txt does not exist"). Raises
    ValueError, so that a pydantic validator reports the field and the config's file:line around it.
    """
    if value is None or not value.startswith("@"):
        return value or None
    path = Path(value[1:]).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{what} file {path} is empty")
    return text


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.-]*=")


def override_texts(args: list[str] | tuple[str, ...]) -> list[str]:
    """Command-line overrides as ``key=value`` texts: align's ``key=value``, and TRL's (HfArgumentParser's)
    ``--key value``, ``--key=value`` and a bare ``--flag`` (true). Dashes in a ``--key`` read as underscores, as
    TRL takes ``--per-device-train-batch-size`` too. A ``--flag`` followed by another option or a ``key=value``
    is a switch turned on."""
    texts: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            texts.append(arg)
            continue
        key, sep, value = arg[2:].partition("=")
        if not key or key.startswith("-"):
            raise ConfigError(f"argument {arg!r}: expected --key value, --key=value or key=value")
        key = key.replace("-", "_")
        if not sep:
            if i < len(args) and not args[i].startswith("--") and not _OVERRIDE.match(args[i]):
                value = args[i]
                i += 1
            else:
                value = "true"
        texts.append(f"{key}={value}")
    return texts


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lora.r=16"`` -> (["lora", "r"], 16). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    if raw.strip().lower() in _YAML11_WORDS:
        return key.split("."), raw.strip()  # `save_strategy=no` means the string "no", not False
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), as_number(value)


# YAML 1.1 turns these into booleans; on a command line they are words (true/false stay booleans).
_YAML11_WORDS = {"yes", "no", "on", "off", "y", "n"}


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def as_number(value: Any) -> Any:
    """YAML 1.1 reads ``5e-6`` (no dot) as a string; everyone means the number."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def _set_nested(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: dict[str, Any] | list[Any] = data
    for depth, part in enumerate(path[:-1]):
        child = _item(node, path, depth) if isinstance(node, list) else node.get(part)
        if not isinstance(child, (dict, list)):
            child = {}
            _put(node, path, depth, child)
        node = child
    _put(node, path, len(path) - 1, value)


def _item(items: list[Any], path: list[str], depth: int) -> Any:
    """The list item ``path[depth]`` names (from 0): a list in a config (e.g. a pipeline's train chain) is set item
    by item, ``train.1.max_steps=10``; a key that is no index would otherwise replace the whole list."""
    part = path[depth]
    if not part.isdigit() or int(part) >= len(items):
        example = [*path[:depth], "0", *path[depth + part.isdigit():]]
        raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:depth])} is a list of {len(items)}; name an "
                          f"item by its index from 0, e.g. {'.'.join(example)}")
    return items[int(part)]


def _put(node: dict[str, Any] | list[Any], path: list[str], depth: int, value: Any) -> None:
    if isinstance(node, list):
        _item(node, path, depth)  # an index that exists
        node[int(path[depth])] = value
    else:
        node[path[depth]] = value


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (str(key_node.value),)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data, _key_lines(text)


def _allowed_keys(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """The field names valid at ``path`` inside ``model`` (for 'did you mean')."""
    current: Any = model
    for part in path:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
        for arg in getattr(current, "__args__", ()) or ():  # Optional[Sub] -> Sub
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def load_config(model: type[C], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                defaults: dict[str, Any] | None = None, updates: dict[str, Any] | None = None) -> C:
    """Build a config from (lowest first) ``defaults``, a YAML file, ``updates`` (e.g. CLI flags or
    Python keyword arguments) and ``key=value`` overrides."""
    data: dict[str, Any] = dict(defaults or {})
    lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        file_data, lines = read_yaml(path)
        data.update(file_data)
    data.update({k: v for k, v in (updates or {}).items() if v is not None})
    from_override: dict[tuple[str, ...], str] = {}
    for text in override_texts(overrides):
        keys, value = parse_override(text)
        _set_nested(data, keys, value)
        from_override[tuple(keys)] = text
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, model, path, lines, from_override)) from None


def _describe(exc: ValidationError, model: type[BaseModel], path: str | Path | None,
              lines: dict[tuple[str, ...], int], from_override: dict[tuple[str, ...], str]) -> str:
    def where(key: tuple[str, ...]) -> str:
        if key in from_override:
            return f"override {from_override[key]!r}"
        if key in lines and path is not None:
            return f"{path}:{lines[key]}"
        return str(path) if path is not None else "config"

    messages = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not loc:  # a whole-config check; point at the key it names, if any
            named = re.search(r"'([^']+)'", message)
            messages.append(f"{where((named.group(1),) if named else ())}: {message}")
            continue
        dotted = ".".join(loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            messages.append(f"{where(loc)}: unknown key '{dotted}'{hint}")
        elif err["type"] == "missing":
            messages.append(f"{where(loc)}: '{dotted}' is required")
        else:
            messages.append(f"{where(loc)}: field '{dotted}': {message} (got {err.get('input')!r})")
    return "\n".join(messages)


def dump_config(config: BaseModel, path: str | Path) -> None:
    """The resolved config, as YAML, written atomically (run dirs keep one)."""
    from align.data.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
