"""Reading a config: YAML preset, dotted command-line overrides, one-line errors."""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from .schema import Config
from .tasks import TASK_TYPES

PRESET_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A mistake in what the user gave (config, data, folders, models): the command prints its one-line
    message and exits 2. Anything else is a bug in gfnlm and keeps its traceback."""


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message is one line naming the key."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'learner.lr=1e-4' -> ('learner.lr', 0.0001); the value is read as YAML, except for a template
    (a key ending in `_template`), which is taken as the text typed: `task.prompt_template={prompt}`
    and `task.prompt_template=Story: {text}` mean what they say (quotes around it are removed)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. learner.lr=1e-4")
    key = key.strip()
    if key.endswith("_template") and raw.strip().lower() not in ("null", "~", "none"):
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        return key, raw[1:-1] if quoted else raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e.problem}); a text holding ': ' or "
                          f"braces needs quotes inside the shell's, e.g. -o '{key}=\"{raw}\"'") from None
    return key, value


def _did_you_mean(loc: tuple) -> str:
    """'; did you mean lr_schedule?' for a misspelt key, from the fields of the section it sits in."""
    import difflib

    from .schema import Config

    current = Config
    for part in loc[:-1]:
        if isinstance(part, str) and part in _UNION_TAGS:  # the member of a discriminated union
            current = next((m for m in sections_in(current) if _tag_of(m) == part), None)
        else:
            model = current if _is_section(current) else next(iter(sections_in(current)), None)
            field = getattr(model, "model_fields", {}).get(str(part)) if model is not None else None
            current = field.annotation if field is not None else None
        if current is None:
            return ""
    model = current if _is_section(current) else None
    fields = list(getattr(model, "model_fields", {}))
    name = str(loc[-1])
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if not close:  # learner.learning_rate -> lr: the key's initials
        initials = "".join(w[:1] for w in name.split("_") if w)
        close = [f for f in fields if len(initials) > 1 and f == initials]
    return f"; did you mean {close[0]}?" if close else ""


def _is_section(a) -> bool:
    return isinstance(a, type) and hasattr(a, "model_fields")


def sections_in(annotation) -> list:
    """The section classes an annotation holds, through Optional, unions and Annotated."""
    import typing

    if _is_section(annotation):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in sections_in(arg)]


def _tag_of(model) -> str | None:
    field = getattr(model, "model_fields", {}).get("type")
    return field.default if field is not None else None


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(err["loc"])
    elif err["type"] == "union_tag_not_found":
        tags = _TARGET_TAGS if loc.endswith("target") else _OBJECTIVE_TAGS if loc.endswith("objective") else _TASK_TAGS
        loc, msg = f"{loc}.type", f"missing; expected one of {tags}"
    elif err["type"] == "union_tag_invalid":
        loc, msg = f"{loc}.type", f"unknown type {err['ctx']['tag']}; expected one of {err['ctx']['expected_tags']}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    quiet = ("extra_forbidden", "missing", "union_tag_not_found", "union_tag_invalid")
    tail = "" if err["type"] in quiet or isinstance(got, dict) or "got" in msg else f" (got {got!r})"
    return f"{loc}: {msg}{tail}" if loc else f"{msg}{tail}"


_UNION_TAGS = {"uniform", "poisson", "binomial", "geometric", "table", "subtb", "tb", "vargrad", "sft", "ppo", *TASK_TYPES}
_TARGET_TAGS = "'uniform', 'poisson', 'binomial', 'geometric', 'table'"
_OBJECTIVE_TAGS = "'subtb', 'tb', 'vargrad', 'sft', 'ppo'"
_TASK_TAGS = ", ".join(repr(t) for t in TASK_TYPES)


def validate(tree: dict, source: str = "config", overrides: Iterable[str] = ()) -> Config:
    """The tree as a Config; the error names the override (`-o KEY=VALUE`) the bad key came from, else `source`."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        errs = e.errors()
        first = _describe(errs[0])
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise ConfigError(f"{_blame(first, overrides) or source}: {first}{more}") from None


def _blame(message: str, overrides: Iterable[str]) -> str | None:
    """The override that set the key a message starts with (or a section above or below it)."""
    m = re.match(r"[A-Za-z_]\w*(\.\w+)*(?=:| \()", message)
    if not m:
        return None
    key = m.group(0)
    for text in reversed(list(overrides)):
        k = text.partition("=")[0].strip()
        if k == key or key.startswith(k + ".") or k.startswith(key + "."):
            return f"-o {text}"
    return None


def resolve_path(path: str) -> str:
    """The config file a name stands for: a path, or the name of a preset in configs/."""
    if os.path.isfile(path):
        return path
    for alt in (os.path.join(PRESET_DIR, path), os.path.join(PRESET_DIR, path + ".yaml")):
        if os.path.isfile(alt):  # a preset by file name, or by its bare name ("continuation")
            return alt
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory; expected a YAML config file (presets live in {PRESET_DIR})")
    raise ConfigError(f"{path}: no such config file; the presets are {', '.join(preset_names())} (in {PRESET_DIR})")


def preset_names() -> list[str]:
    """The configs shipped in configs/ (without .yaml)."""
    return sorted(n[:-5] for n in os.listdir(PRESET_DIR) if n.endswith(".yaml"))


def read_yaml(path: str) -> dict:
    path = resolve_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied; the config file must be readable") from None
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise ConfigError(f"{path}: the file is empty; give it sections such as task: and learner: (see "
                          f"{os.path.join(PRESET_DIR, 'random_number.yaml')}, and docs/config.md for every key)")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return with_base(tree, path, os.path.dirname(path))


def with_base(tree: dict, source: str, folder: str = ".") -> dict:
    """The tree on top of the preset its `base:` names (looked up beside `folder` first, then as a
    preset), section by section; the tree as it is without one."""
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{source}: base: expected the file name of another preset")
    here = os.path.join(folder, base)
    return _merge(read_yaml(here if os.path.isfile(here) else base), tree)


ATOMIC = ("data",)
"""Sections a preset gives whole: a child's `task.data` replaces its parent's, so that a new train
file never pairs silently with the parent's test file."""


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (a preset may name another as its `base`); a
    section with its own `type:` and the ATOMIC ones replace the parent's whole."""
    out = dict(base)
    for k, v in over.items():
        deep = isinstance(v, dict) and isinstance(out.get(k), dict) and "type" not in v and k not in ATOMIC
        out[k] = _merge(out[k], v) if deep else v
    return out


def load_config(path: str | dict | None = None, overrides: Iterable[str] = ()) -> Config:
    """Preset file (a path or a preset's name), or a tree of sections as a YAML file holds it (a dict,
    which may name a preset as its `base`), or the defaults; then dotted overrides; validated as one tree."""
    if isinstance(path, dict):
        tree, source = with_base(copy.deepcopy(path), "config"), "config"
    else:
        tree = read_yaml(path) if path else {}
        source = path or "config"
    overrides = list(overrides)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return validate(tree, source=source, overrides=overrides)


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
