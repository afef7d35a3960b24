"""The one format version of every file loopfm saves and reads back: a run's `config.json`,
FM checkpoints, a trained VM's `model.pt` and an exported model's `model.json`. A file of
another version is refused, never read with guessed defaults; the message names what to re-run."""

from __future__ import annotations

from pathlib import Path

FORMAT_VERSION = 2  # raised whenever a saved file's meaning changes (CHANGELOG.md says how)
FORMAT_KEY = "format_version"


class FormatError(ValueError):
    """A saved file of another format version than this loopfm reads."""


def check_format(saved: dict, path: Path, fix: str) -> None:
    """Raise FormatError unless `saved` (a file's top-level mapping) carries FORMAT_VERSION.
    `fix` says what writes the file again, e.g. "re-run `loopfm vm export`"."""
    found = saved.get(FORMAT_KEY)
    if found != FORMAT_VERSION:
        raise FormatError(f"{path} has format version {found if found is not None else 'none (an older loopfm)'}, "
                          f"this loopfm reads version {FORMAT_VERSION}: {fix}")  # fmt: skip
