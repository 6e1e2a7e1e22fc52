"""The error every config check raises and the one-line check that raises it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError`` naming the dotted ``key`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")
