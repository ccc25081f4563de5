"""Command-line flags built from the stage configs: an option is declared once, on its config.

Each field of a stage's pydantic config becomes a flag (``max_tokens`` -> ``--max-tokens``)
whose help is the field's ``description`` and whose shown default is the field's own
default; a flag the user does not give is not passed, so the config's default applies.
A field's ``json_schema_extra`` may say how the command line reaches it:

- ``{"cli": False}``: recipe-only (set in a recipe section, or by the command itself);
- ``{"cli": "key=value"}``: a dict given as repeated ``--flag KEY=VALUE`` (values as YAML);
- ``{"cli": "text"}``: passed as the string typed (the config's validator parses it, e.g.
  ``--freeze vision,projector``);
- ``{"flag": "base-url"}``: the flag's name when it is not the field's.

A nested config (the LLM spec of ``vpd sample``) is a :class:`Group`: its fields become
flags too and arrive as one dict.
"""

from __future__ import annotations

import errno
import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from vpd.errors import VpdError
from vpd.options import split_option

_SCALARS = (int, float, str, bool, Path)


def cli_mode(field: FieldInfo) -> Any:
    """How the command line sets ``field`` (see the module docstring); True: a plain flag."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get("cli", True)


def flag_name(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return "--" + str(extra.get("flag", name.replace("_", "-")))


def _strip_optional(ann: Any) -> Any:
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def flag_type(field: FieldInfo) -> Any:
    """The Python type typer parses the flag as; None when the field cannot be a flag."""
    mode = cli_mode(field)
    if mode == "key=value":
        return list[str]
    if mode == "text":
        return str
    ann = _strip_optional(field.annotation)
    if get_origin(ann) is Literal:
        return str
    if get_origin(ann) is list:
        item = _strip_optional(get_args(ann)[0])
        if get_origin(item) is Literal:
            return list[str]
        if item in _SCALARS:
            return list[item]  # type: ignore[valid-type]
    return ann if ann in _SCALARS else None


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    ann = _strip_optional(field.annotation)
    if get_origin(ann) is list:
        ann = _strip_optional(get_args(ann)[0])
    if get_origin(ann) is Literal and "|" not in text:
        text += f" ({'|'.join(str(a) for a in get_args(ann))})"
    return text


def _shown_default(field: FieldInfo) -> str | bool:
    if field.is_required() or field.default_factory is not None or field.default is None:
        return False
    return str(field.default)


@dataclass(frozen=True)
class Group:
    """A nested config whose fields are flags of the command (``into``: the field of the
    command's config they fill, as a dict)."""

    cls: type[BaseModel]
    into: str
    only: tuple[str, ...] | None = None  # these fields alone (None: every field)


def _parameters(
    cls: type[BaseModel],
    args: tuple[str, ...],
    skip: tuple[str, ...],
    only: tuple[str, ...] | None = None,
) -> list[tuple[str, inspect.Parameter, FieldInfo]]:
    params = []
    for name, field in cls.model_fields.items():
        if name in skip or cli_mode(field) is False or (only is not None and name not in only):
            continue
        typ = flag_type(field)
        if typ is None:
            raise TypeError(f"{cls.__name__}.{name} cannot be a flag: mark it cli=False")
        required = field.is_required() and name not in skip
        if name in args:
            info = typer.Argument(... if required else None, help=_help(field), show_default=False)
        else:
            decl = flag_name(name, field)
            if typ is bool and "/" not in decl:  # a "flag": "lora/--full" names both
                decl = f"{decl}/--no-{decl[2:]}"
            info = typer.Option(
                ... if required else None,
                decl,
                help=_help(field),
                show_default=_shown_default(field),
            )
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append((name, inspect.Parameter(name, kind, default=info, annotation=typ), field))
    return params


def values(given: dict[str, Any], fields: dict[str, FieldInfo]) -> dict[str, Any]:
    """The flags the user gave, as config values (``KEY=VALUE`` lists become dicts)."""
    out = {}
    for name, value in given.items():
        if value is None or (isinstance(value, list) and not value):
            continue
        if name in fields and cli_mode(fields[name]) == "key=value":
            flag = flag_name(name, fields[name])
            value = dict(split_option(v, flag, "KEY=VALUE") for v in value)
        out[name] = value
    return out


def config_command(
    app: typer.Typer,
    name: str,
    cls: type[BaseModel],
    *,
    args: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    group: Group | None = None,
    extra: tuple[inspect.Parameter, ...] = (),
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``fn(options: dict, **extra)`` as the command ``name``: its flags are
    ``cls``'s fields (positional ``args`` first, in that order; ``skip``: set by the
    command itself), plus ``group``'s and the hand-written ``extra`` parameters. ``fn``
    gets the given flags as config values (``group``'s as one dict under ``group.into``)
    and builds the config. The help is ``cls``'s docstring (what the stage does) followed
    by ``fn``'s (its examples)."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        own = _parameters(cls, args, skip)
        nested = _parameters(group.cls, (), (), group.only) if group else []
        taken = {n for n, _, _ in own}
        clash = [n for n, _, _ in nested if n in taken]
        if clash:
            raise TypeError(f"{name}: {group.cls.__name__} flags {clash} clash with the command's")
        position = {n: i for i, n in enumerate(args)}
        ordered = sorted(own, key=lambda p: position.get(p[0], len(args)))
        fields = {n: f for n, _, f in ordered + nested}
        nested_names = {n for n, _, _ in nested}

        @functools.wraps(fn)
        def command(**kw: Any) -> None:
            hand = {p.name: kw.pop(p.name) for p in extra}
            options = values({k: v for k, v in kw.items() if k not in nested_names}, fields)
            if group is not None:
                options[group.into] = values(
                    {k: v for k, v in kw.items() if k in nested_names}, fields
                )
            try:
                fn(options, **hand)
            except ValidationError as e:  # a bad value: one line naming the flag typed
                raise VpdError(validation_line(e, fields)) from None

        params = [p for _, p, _ in ordered] + [p for _, p, _ in nested] + list(extra)
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        # The help: what the stage does (its config's docstring), then the examples (``fn``'s).
        parts = (inspect.cleandoc(cls.__doc__ or ""), inspect.cleandoc(fn.__doc__ or ""))
        command.__doc__ = "\n\n".join(p for p in parts if p)
        app.command(name)(command)
        return command

    return register


def stage_command(
    app: typer.Typer,
    name: str,
    cls: type[BaseModel],
    run: Callable[[Any], Any],
    line: Callable[[Any, Any], str],
    **how: Any,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """:func:`config_command` for a stage: the config is built from the flags, ``run``
    runs it and ``line(cfg, summary)`` is printed. The decorated function gives the help
    (its docstring) and may adjust the given flags first (its body)."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def body(options: dict[str, Any], **hand: Any) -> None:
            from vpd.progress import console

            fn(options, **hand)
            cfg = cls(**options)
            text = line(cfg, run(cfg))
            if text:
                console().print(text, markup=False, highlight=False)

        return config_command(app, name, cls, **how)(body)

    return register


def validation_line(e: ValidationError, fields: dict[str, FieldInfo] | None = None) -> str:
    """A config's validation error as one line, each error named by its flag (``fields``:
    the command's flags, whose names may differ from the fields')."""
    parts = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = err["loc"]
        if not loc:  # a check across fields: its message names them
            parts.append(msg)
            continue
        name = str(loc[0])
        flag = flag_name(name, fields[name]) if fields and name in fields else "--" + name
        parts.append(f"{flag.split('/')[0]}: {msg}")
    return "; ".join(parts)


def option(name: str, typ: Any, info: Any) -> inspect.Parameter:
    """A hand-written parameter for :func:`config_command`'s ``extra`` (not a config field)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=typ)


def os_error_line(e: OSError) -> str:
    """An OSError as one line: what failed and on which path (no errno tuple)."""
    what = e.strerror or type(e).__name__
    paths = [str(x) for x in (e.filename, e.filename2) if x is not None]
    if paths:
        # mkdir under a file says "File exists" about the file: say which one is in the way.
        blocker = next((a for a in Path(paths[0]).parents if a.is_file()), None)
        if blocker is None and Path(paths[0]).is_file() and e.errno == errno.EEXIST:
            blocker = Path(paths[0])
        if blocker is not None:
            return f"cannot write under {blocker}: it is a file, not a folder"
    return f"{what}: {' -> '.join(paths)}" if paths else str(e)
