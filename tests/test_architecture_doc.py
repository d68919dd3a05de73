"""docs/architecture.md promises that every file, class and function it names in code font
exists. This holds it to that, so the map cannot drift from the code it describes.

A code span is checked when it is a path (it starts with a top-level folder of the
repository) or a single identifier (a class, function, constant or setting: letters, digits,
'_' and dots, with an optional trailing call '(...)'); the identifier must occur in the code
(services/, workflow/, proto/, tests/, deploy/, pyproject.toml, the Makefile). Spans with
placeholders (`<stage>`), commands, values and sentences are prose, not names, and are left alone.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
SEARCHED = ("services", "workflow", "proto", "tests", "deploy", "bench")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\(.*\))?$")


def code_spans(text: str) -> list[str]:
    # Fenced blocks are diagrams and commands, not inline names.
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", prose)


@cache
def corpus() -> str:
    files = [p for folder in SEARCHED for p in (REPO / folder).rglob("*") if p.is_file()]
    files += [REPO / "pyproject.toml", REPO / "Makefile"]
    texts = []
    for path in files:
        if path.suffix in {".py", ".pyi", ".proto", ".yaml", ".yml", ".toml", ""} or path.name == "Dockerfile":
            try:
                texts.append(path.read_text())
            except (UnicodeDecodeError, OSError):
                continue
    return "\n".join(texts)


def test_the_map_names_only_paths_that_exist() -> None:
    spans = [s for s in code_spans(DOC.read_text()) if "/" in s and " " not in s and "<" not in s]
    # A repository path starts at one of its top-level folders; other spans with a '/' are
    # store layouts (`objects/...`) or annotations (`prometheus.io/port`).
    top = {p.name for p in REPO.iterdir() if p.is_dir()}
    paths = [s.split(":")[0].rstrip("/") for s in spans if s.split("/")[0] in top]
    assert len(paths) > 20, paths  # the map names many files; an empty list means the parser broke
    missing = [p for p in paths if "*" not in p and not (REPO / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_map_names_only_identifiers_the_code_defines() -> None:
    names = {s for s in code_spans(DOC.read_text()) if IDENTIFIER.match(s)}
    words = {re.sub(r"\(.*\)$", "", name).split(".")[-1] for name in names}
    # Short lowercase words in code font are values (`auto`, `none`), not names to look up.
    words = {w for w in words if len(w) > 3 and ("_" in w or any(c.isupper() for c in w))}
    assert len(words) > 40, sorted(words)
    text = corpus()
    missing = sorted(w for w in words if not re.search(rf"\b{re.escape(w)}\b", text))
    assert not missing, f"docs/architecture.md names identifiers the code does not define: {missing}"
