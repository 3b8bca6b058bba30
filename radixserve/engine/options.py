"""Command-line flags for the engine, one per EngineConfig field, made from the fields themselves.

`serve`, `generate` and `replay --live` share them. A flag left out stays None and never
reaches EngineConfig, so the dataclass holds the only defaults; the help shows them.
Booleans take `--name` / `--no-name`; fields with choices list them.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from radixserve.engine.config import EngineConfig

_TYPES = {"int": int, "float": float, "str": str}
_METAVARS = {"int": "N", "float": "X", "str": "NAME"}


def _flag(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def engine_flag(f: dataclasses.Field) -> str:
    """The command-line flag of an EngineConfig field (`--max-running-requests`); `serve --dp` builds its
    replicas' command lines with it."""
    return _flag(f)


def add_engine_options(p: argparse.ArgumentParser, title: str = "engine options") -> None:
    """Add a flag for every EngineConfig field to `p` (in a group of its own, named `title`)."""
    group = p.add_argument_group(title)
    for f in dataclasses.fields(EngineConfig):
        kind = str(f.type).replace(" | None", "")
        default = "" if f.default is None else f" (default: {_shown(f.default)})"
        help_text = f.metadata["help"] + default
        if kind == "bool":
            group.add_argument(_flag(f), *f.metadata["aliases"], dest=f.name,
                               action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            metavar = None if choices else _METAVARS[kind]
            group.add_argument(_flag(f), *f.metadata["aliases"], dest=f.name, type=_TYPES[kind], choices=choices,
                               default=None, metavar=metavar, help=help_text)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig options given on the command line (the others keep their defaults)."""
    kw = {}
    for f in dataclasses.fields(EngineConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            kw[f.name] = value
    return kw


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
