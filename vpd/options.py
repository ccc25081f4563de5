"""``KEY=VALUE`` options given on the command line (``--set``, ``--tool-opt``).

Values are YAML so ``k=3``, ``k=0.5``, ``k=true`` and ``k=[a, b]`` arrive typed; text that is
not valid YAML (``k=[a``) stays a string instead of failing with a parser traceback.
"""

from __future__ import annotations

from typing import Any

import yaml

from vpd.errors import VpdError


def parse_value(text: str) -> Any:
    """``text`` as YAML, or as itself when it is not valid YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_option(item: str, flag: str, form: str = "key=value") -> tuple[str, Any]:
    """``(key, parsed value)`` of one ``KEY=VALUE`` item; a clear error names ``flag``."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise VpdError(f"{flag} expects {form}, got {item!r}")
    return key, parse_value(value)


# The options every stage has, declared once (their configs use these fields).
def force_field() -> Any:
    from pydantic import Field

    return Field(False, description="Start OUT over if it holds output made with other options.")


def progress_field() -> Any:
    from pydantic import Field

    return Field(True, description="Show a progress bar.")


def shard_field() -> Any:
    from pydantic import Field

    return Field(
        None, description="Only shard i/n of the questions (by a stable hash of the id), e.g. 0/4."
    )
