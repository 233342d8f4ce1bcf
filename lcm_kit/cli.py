"""Dataclasses -> argparse: one ``--field`` per dataclass field, help from ``metadata["help"]``.

Types understood: ``int``, ``float``, ``str``, ``bool`` (``--flag`` / ``--flag true|false``), ``X | None`` and
``Literal[...]`` (choices). Fields without a default are required. Validation stays in the dataclasses'
``__post_init__``: parsing only converts strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _str2bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    tp, optional = _unwrap_optional(tp)
    kwargs: dict[str, Any] = {"help": f.metadata.get("help", "")}
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
        kwargs["help"] += f" (default: {f.default!r})"
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        kwargs["default"] = f.default_factory()  # type: ignore[misc]
    else:
        kwargs["required"] = True
    if typing.get_origin(tp) is Literal:
        choices = list(typing.get_args(tp))
        kwargs.update(type=type(choices[0]), choices=choices)
    elif tp is bool:
        kwargs.update(type=_str2bool, nargs="?", const=True, metavar="{true,false}")
    elif tp in (int, float, str):
        kwargs["type"] = tp
    else:
        raise TypeError(f"field {f.name!r}: unsupported type {tp!r}")
    if optional:
        inner = kwargs.get("type", str)
        kwargs["type"] = lambda s, inner=inner: None if s.lower() in ("none", "null", "") else inner(s)
    parser.add_argument(f"--{f.name}", **kwargs)


def build_parser(
    classes: Sequence[type], exclude: Sequence[str] = (), **parser_kwargs: Any
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one argument group per dataclass (``exclude`` names fields left out)."""
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **parser_kwargs)
    parser.formatter_class = argparse.HelpFormatter  # defaults are already in the help strings
    for cls in classes:
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in exclude and f.init:
                _add_field(group, f, hints[f.name])  # type: ignore[arg-type]
    return parser


def parse_dataclasses(
    classes: Sequence[type], argv: Sequence[str] | None = None, exclude: Sequence[str] = (), **parser_kwargs: Any
) -> tuple[Any, ...]:
    """Parses ``argv`` into one instance of each dataclass (their ``__post_init__`` validates the values).

    Raises:
        ValueError: from a dataclass's validation (argparse itself exits on unknown flags / bad types).
    """
    ns = vars(build_parser(classes, exclude, **parser_kwargs).parse_args(argv))
    out = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude}
        out.append(cls(**{k: v for k, v in ns.items() if k in names}))
    return tuple(out)
