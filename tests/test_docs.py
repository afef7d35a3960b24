"""The documentation: a short README that opens with what loopfm is, links that resolve, and
`loopfm` commands that the CLI accepts (each is also run by a test or by `make demo`)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from loopfm.pipeline.cli import build_parser

ROOT = Path(__file__).parents[1]
GENERATED = {"results.md", "results-real.md", "benchmarks.md", "benchmarks-stream.md"}  # written by make targets
WRITTEN_LATER = {"docs/benchmarks-stream.md", "docs/benchmarks-stream.json"}  # by `make bench-stream`
PAGES = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in GENERATED)]


def test_the_readme_is_short_and_opens_with_what_loopfm_is():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024
    assert text.split("\n\n")[1].startswith("loopfm is ")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page: Path):
    text = page.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # [text](path), relative to the page
        path = (page.parent / target).resolve()
        if "://" not in target and not path.exists() and str(path.relative_to(ROOT)) not in WRITTEN_LATER:
            missing.append(target)
    for target in re.findall(r"`((?:docs|loopfm|serving|tests|examples|feature_repo|containers)/[\w./-]+\.\w+)`", text):
        if not (ROOT / target).exists() and target not in WRITTEN_LATER:  # `docs/x.md`, relative to the repository
            missing.append(target)
    assert not missing, f"{page.name}: {missing}"


def _commands(text: str) -> list[str]:
    """The `loopfm ...` command lines of a page's sh blocks (continuations joined, comments,
    environment assignments, `[optional]` groups and a trailing & dropped)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line.split("&&")[0]).strip()
            line = re.sub(r"\[[^\]]*\]", "", line).rstrip("& ")
            words = shlex.split(line) if line else []
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            if words[:1] == ["loopfm"]:
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_loopfm_command_parses(page: Path):
    parser = build_parser()
    commands = _commands(page.read_text())
    if page.name in ("README.md", "getting-started.md", "your-data.md", "scaling.md"):
        assert commands, f"{page.name}: no loopfm command found (is the block still ```sh?)"
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"{page.name}: `loopfm {' '.join(words)}` is not a valid command")
