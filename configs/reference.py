"""The reference of every config key, generated from the field docstrings (docs/config.md).

`python -m gfnlm.configs.reference > docs/config.md` writes it; a test keeps the file current.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .load import sections_in
from .schema import Config


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    for noise in ("typing.", "configs.schema.", "configs.tasks.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None").replace("|", " | ").replace("  ", " ")


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        d = field.default
        return "" if isinstance(d, BaseModel) else repr(d)
    if field.default_factory is not None:
        d = field.default_factory()
        return "" if isinstance(d, BaseModel) else repr(d)
    return "(required)"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _walk(model: type[BaseModel], prefix: str, out: list[str], seen: set) -> None:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        members = sections_in(field.annotation)
        if members:
            if typing.get_origin(field.annotation) is dict:  # a mapping of named sections: task.test_sets.<name>
                key = f"{key}.<name>"
            for member in members:
                tag = member.model_fields.get("type")
                label = f"{key} (type: {tag.default})" if tag is not None and len(members) > 1 else key
                text = member.__doc__ or field.description
                if len(members) == 1 and field.description and field.description.strip() not in (member.__doc__ or ""):
                    text = f"{field.description} {member.__doc__ or ''}"  # what this field is, then what the section is
                out.append(f"\n### `{label}`\n\n{_one_line(text)}\n")
                if (label, member) in seen:
                    continue
                seen.add((label, member))
                out.append("| key | type | default | what it does |\n| --- | --- | --- | --- |")
                rows = []
                for sub_name, sub in member.model_fields.items():
                    if sections_in(sub.annotation):
                        continue
                    rows.append(f"| `{key}.{sub_name}` | {_one_line(_type_name(sub.annotation))} | "
                                f"{_one_line(_default(sub))} | {_one_line(sub.description)} |")
                out.extend(rows)
                _walk(member, f"{key}.", out, seen)


def reference_markdown() -> str:
    """docs/config.md: every key of the config tree with its type, default and docstring."""
    out = ["# Configuration reference",
           "",
           "Generated from the field docstrings by `python -m gfnlm.configs.reference > docs/config.md`; "
           "`tests/test_config.py` keeps it current. Presets in `configs/` set some of these; "
           "`-o KEY=VALUE` sets any of them. A preset may name another as its `base:` and override "
           "it section by section (a section with its own `type:` replaces the parent's whole, and so does `task.data`: a new train file never keeps the parent's test file)."]
    _walk(Config, "", out, set())
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
