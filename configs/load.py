"""Load a ponder config: YAML with `base:` inheritance, dotted overrides, typed validation.

    cfg = load_config("configs/experiments/tiny.yaml", ["model.num_layers=4", "mesh.fsdp=-1"])

A file may name other files in a top-level `base:` (a path, or a list of paths, relative to
the file that names them). Every load starts from the schema's defaults (what base.yaml
lists), so a file that names no base merges over the same ones, logical axis rules included.
Bases are applied first, in order, each file at most once per load (so two bases that share
a parent do not re-apply it), then the file itself. Applying means a deep merge: mappings
merge key by key, anything else (scalars, lists) replaces.
The exception is `data.mixture`: a mixture is one whole, so a file or override that gives
one replaces the inherited mixture instead of adding components to it.
Overrides `key.sub=value` are applied last; the value is parsed as YAML (`4` is an int,
`null` is None, `[data, fsdp]` a list).

The merge remembers which file (or override) set each key, so a validation error names
the place to fix: `<source>: <dotted.key>: <message>`, one line per problem.

A path that does not exist as given is looked up in this directory (the packaged
configs): `NAME`, `NAME.yaml`, then `models/NAME.yaml`. So `tiny` is `models/tiny.yaml`,
`experiments/tiny` is `experiments/tiny.yaml` and `base` is `base.yaml`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from configs.fileio import is_remote, run_path, write_atomic
from configs.schema import Config

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = CONFIG_DIR / "base.yaml"

KeyPath = tuple[Any, ...]
M = TypeVar("M", bound=BaseModel)
Sources = dict[KeyPath, str]  # key path -> who set it; insertion order = order applied


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names where and why."""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads `path` (None: configs/base.yaml) with its bases, applies `overrides`, validates."""
    return load_model(Config, resolve_path(path), overrides, Config().model_dump(mode="json"))


def load_model(model: type[M], path: Path, overrides: Sequence[str] = (), defaults: dict | None = None) -> M:
    """`model` (a schema class) from the YAML file `path`, its bases and `overrides`, merged over `defaults`.

    The same merge, override syntax and error messages as a ponder config: launch specs
    (configs/launch_spec.py) load this way too.
    """
    sources: Sources = {}
    # Merging over the defaults (not {}) keeps a partial `logical_axis_rules:` from dropping the other rules.
    data = _apply_file(defaults or {}, path, stack=[], applied=set(), sources=sources)
    for override in overrides:
        data = _merge(data, _parse_override(override), f"command-line override `{override}`", sources)
    what = "config" if model is Config else (model.__doc__ or model.__name__).split(":")[0].lower()
    return _validate(data, sources, str(path), f"invalid {what} {path}", model)


def with_overrides(cfg: Config, overrides: Sequence[str], source: str) -> Config:
    """`cfg` with dotted `key=value` overrides applied and validated; errors name `source` and the override."""
    sources: Sources = {}
    data = cfg.model_dump(mode="json")
    for override in overrides:
        data = _merge(data, _parse_override(override), f"{source} `{override}`", sources)
    return _validate(data, sources, source, f"invalid config after {source}")


def _validate(data: dict, sources: Sources, default_source: str, heading: str, model: type[M] = Config) -> M:
    """The `model` of `data`, or a ConfigError: `heading`, then one line per problem naming who set the key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = _describe_errors(err, data, sources, default_source, model)
        raise ConfigError(f"{heading}:\n" + "\n".join(f"  {line}" for line in lines)) from None


def resolve_path(path: str | Path | None) -> Path:
    """The config file `path` names: as given if it exists, else looked up in the packaged configs."""
    if path is None:
        return DEFAULT_CONFIG
    if is_remote(path):  # a run's config.yaml on a bucket: resolved, so it has no relative bases to find
        if not run_path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        return run_path(path)
    given = Path(path).expanduser()
    candidates = [given]
    if not given.is_absolute():
        name = str(given)
        candidates += [CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / "models" / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file not found: {path} (also looked in {CONFIG_DIR} for {path}[.yaml])")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; loading it back gives an equal `Config`."""
    header = "# Resolved ponder config (all bases and overrides applied).\n"
    return header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Writes `run_dir/config.yaml` atomically (temp file, then rename) and returns its path."""
    return write_atomic(run_path(run_dir) / "config.yaml", dump_config(cfg))


def _read_yaml(path: Path) -> dict[str, Any]:
    """One file's own mapping; YAML errors name the file and line."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _apply_file(data: dict, path: Path, stack: list[Path], applied: set[Path], sources: Sources) -> dict:
    """Merges `path`'s bases, then `path` itself, over `data`."""
    if path in stack:
        chain = " -> ".join(str(p) for p in [*stack[stack.index(path) :], path])
        raise ConfigError(f"inheritance cycle in `base:`: {chain}")
    if path in applied:
        return data
    own = _read_yaml(path)
    bases = own.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: must be a file path or a list of file paths, got {bases!r}")
    for base in bases:
        base_path = (path.parent / Path(base).expanduser()).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: base file not found: {base} (looked for {base_path})")
        data = _apply_file(data, base_path, [*stack, path], applied, sources)
    applied.add(path)
    return _merge(data, own, str(path), sources)


WHOLE_MAPPINGS = {("data", "mixture")}  # replaced, never merged key by key


def _merge(base: dict, over: dict, source: str, sources: Sources, prefix: KeyPath = ()) -> dict:
    """Deep merge of `over` onto `base` (new dict), recording `source` for every key it sets."""
    out = dict(base)
    for key, value in over.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and path not in WHOLE_MAPPINGS:
            out[key] = _merge(out[key], value, source, sources, path)
            sources.pop(path, None)
            sources[path] = source
        else:
            for stale in [p for p in sources if p[: len(path)] == path]:
                del sources[stale]
            out[key] = value
            _record(path, value, source, sources)
    return out


def _record(path: KeyPath, value: Any, source: str, sources: Sources) -> None:
    sources[path] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record((*path, key), sub, source, sources)


def _parse_override(override: str) -> dict:
    """`a.b=value` -> {"a": {"b": parsed value}}."""
    key, sep, text = override.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"bad override `{override}`: expected key.sub=value, e.g. model.num_layers=4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"bad override `{override}`: value is not valid YAML: {err}") from None
    for part in reversed(parts):
        value = {part: value}
    return value


def _describe_errors(err: ValidationError, data: dict, sources: Sources, default_source: str,
                     model: type[BaseModel] = Config) -> list[str]:
    """One line `<source>: <key>: <message>` per distinct problem in `err`."""
    # A union (a rule is an axis, a list of axes or null) fails once per branch: one line per key.
    grouped: dict[tuple[str, str], tuple[list[str], str]] = {}
    for e in err.errors():
        path = _data_path(data, e["loc"])
        dotted = ".".join(str(p) for p in path) or "<top level>"
        got = ""
        if e["type"] == "extra_forbidden":
            message = "unknown key; " + _suggest(path, model)
        elif e["type"] in ("value_error", "assertion_error"):
            message = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        else:
            message, got = e["msg"], f" (got {e['input']!r})"
        messages, _ = grouped.setdefault((_source_of(path, sources, default_source), dotted), ([], got))
        if message not in messages:
            messages.append(message)
    return [f"{src}: {key}: {'; or '.join(msgs)}{got}" for (src, key), (msgs, got) in grouped.items()]


def _data_path(data: Any, loc: tuple) -> KeyPath:
    """The part of a pydantic error location that exists in the data (drops union branch tags)."""
    path: list[Any] = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            break
        path.append(part)
    return tuple(path)


def _source_of(path: KeyPath, sources: Sources, default: str) -> str:
    """Who set `path`: the last source to touch it or any key under it, else its nearest parent."""
    under = [src for p, src in sources.items() if p[: len(path)] == path]
    if under:
        return under[-1]
    for cut in range(len(path) - 1, 0, -1):
        if path[:cut] in sources:
            return sources[path[:cut]]
    return default


def _suggest(path: KeyPath, model: type[BaseModel] = Config) -> str:
    """`did you mean ...?` for an unknown key at `path`, else the valid keys of its section."""
    section: type[BaseModel] = model
    for part in path[:-1]:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "not a section with named keys"
        section = annotation
    names = list(section.model_fields)
    close = difflib.get_close_matches(str(path[-1]) if path else "", names, n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
