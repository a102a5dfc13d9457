"""The one error type for a user's mistake."""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A mistake in the user's config, data or command line.

    The message always names the offending key (or file), the value found and what to do
    about it; the command-line entry points print it without a traceback and exit with 2.
    """

    def __init__(self, key: str, value: object, fix: str, problem: str = "") -> None:
        self.key = key
        self.value = value
        self.fix = fix
        what = f": {problem}" if problem else ""
        super().__init__(f"{key}={value!r}{what}. Fix: {fix}")


class ConfigErrors(ConfigError):
    """Several mistakes found together, reported in one message (e.g. DeepSpeed JSON)."""

    def __init__(self, errors: list[ConfigError], context: str) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        ValueError.__init__(self, f"{context}: {len(errors)} problem(s)\n{lines}")
        self.key = ", ".join(e.key for e in errors)
        self.value = [e.value for e in errors]
        self.fix = "; ".join(e.fix for e in errors)


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off by environment variable, which an
    error message about a hub name must say."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(
        os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on")
        for n in names
    )
