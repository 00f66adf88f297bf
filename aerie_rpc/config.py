"""Service configuration: one typed dataclass per service, read from flags and from the
environment. Every field `foo_bar` is the flag `--foo-bar` and the variable `AERIE_FOO_BAR`;
a flag beats the variable, which beats the default. Help texts come from field metadata."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from aerie.errors import InputError

C = TypeVar("C")


def env_name(field_name: str) -> str:
    return "AERIE_" + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, secret: bool = False,
           group: str | None = None) -> Any:
    """A config field. A `secret` one is left out of the config's repr (and so out of logs);
    `group` titles a section of --help (shared settings such as TLS sit there, after the
    service's own)."""
    return dataclasses.field(default=default, repr=not secret,
                             metadata={"help": help, "choices": choices, "group": group})


def _kind(tp: Any) -> type:
    """The scalar type a field is parsed as: str, int, float, bool or tuple (of str)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _kind(args[0])
    if origin is tuple or tp is tuple:
        return tuple
    return tp


def _parse(kind: type, raw: str, where: str) -> Any:
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind in (int, float):
            return kind(raw)
        return raw
    except ValueError:
        raise InputError(f"{where}: cannot read {raw!r} as {kind.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; defaults are left out so that the environment can fill them."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        kind = _kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        text = f"{f.metadata.get('help', '')} [env {env_name(f.name)}; default {shown}]"
        title = f.metadata.get("group")
        where = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        if kind is bool:
            where.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            where.add_argument(flag_name(f.name), dest=f.name, default=argparse.SUPPRESS, help=text,
                               metavar=f.name.upper(), choices=f.metadata.get("choices"))


def from_args(cls: type[C], args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> C:
    """Build the config: flags in `args` first, then AERIE_* variables, then defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _kind(hints[f.name])
        if args is not None and hasattr(args, f.name):
            raw = getattr(args, f.name)
            values[f.name] = _parse(kind, raw, flag_name(f.name)) if isinstance(raw, str) else raw
        elif env_name(f.name) in environ:
            values[f.name] = _parse(kind, environ[env_name(f.name)], env_name(f.name))
        choices = f.metadata.get("choices")
        if choices and f.name in values and values[f.name] not in choices:
            raise InputError(f"{flag_name(f.name)}: {values[f.name]!r} is not one of {', '.join(choices)}")
    return cls(**values)


def parser_for(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls)
    return parser


def service_main(cls: type[C], prog: str, description: str, run: typing.Callable[[C], int],
                 argv: list[str] | None = None) -> int:
    """`python -m <service>`: parse flags and AERIE_* variables into `cls`, then `run` it;
    a bad setting ends as one line on stderr and exit status 2."""
    import logging
    import sys

    from aerie.errors import AerieError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = parser_for(cls, prog, description)
    try:
        return run(from_args(cls, parser.parse_args(argv)))
    except (AerieError, OSError) as e:
        print(f"aerie: error: {e}", file=sys.stderr)
        return 2
