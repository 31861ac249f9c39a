"""Every link in the docs resolves, and the docs name what the checkout holds:
the file a link names exists in the checkout,
and the heading it points at (``#anchor``) is one of that file's headings,
as GitHub makes anchors of them.

Covers README.md, docs/, client/, daemon/ and benchmarks/ markdown. Links to
other sites are not fetched (no network in CI); they must at least be
well-formed URLs.
"""

import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[3]
PLACES = ("README.md", "docs", "client", "daemon", "benchmarks")
# [text](target) and [text]: target (reference definitions); images too.
INLINE = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
URL = re.compile(r"^(https?|mailto):[^\s]+$")


def markdown_files() -> List[Path]:
    out: List[Path] = []
    for place in PLACES:
        path = REPO / place
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += sorted(path.rglob("*.md"))
    return out


def prose_lines(path: Path) -> List[Tuple[int, str]]:
    """(line number, text) outside fenced code blocks, inline code removed."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"`[^`]*`", "``", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower
    case, spaces to hyphens (letters, digits, '-' and '_' stay)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    found: Set[str] = set()
    seen: Dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links() -> List[Tuple[Path, int, str]]:
    out = []
    for path in markdown_files():
        for number, line in prose_lines(path):
            for target in INLINE.findall(line):
                out.append((path, number, target))
            m = REFERENCE.match(line)
            if m:
                out.append((path, number, m.group(1)))
    return out


def problem(path: Path, target: str) -> str:
    """Why ``target`` (linked from ``path``) does not resolve, or ""."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        return "" if URL.match(target) else f"not a well-formed URL: {target}"
    name, _, anchor = target.partition("#")
    dest = (path.parent / name).resolve() if name else path
    if not dest.exists():
        return f"{name} does not exist"
    try:
        dest.relative_to(REPO)
    except ValueError:
        return f"{name} is outside the checkout"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"no heading with anchor #{anchor} in {dest.relative_to(REPO)}"
    return ""


def test_slugs_are_githubs():
    assert slug("3. Async-native: `AsyncConcurrentHandler`") == "3-async-native-asyncconcurrenthandler"
    assert slug("What a killed process loses") == "what-a-killed-process-loses"
    assert slug("get_stats()") == "get_stats"
    assert slug("[Loss](x.md) & more") == "loss--more"


def test_a_broken_link_is_caught(tmp_path, monkeypatch):
    """The negative control: a missing file and a missing anchor are reported."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Section one\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert problem(page, "page.md#section-one") == ""
    assert "no heading" in problem(page, "page.md#section-two")
    assert "does not exist" in problem(page, "other.md")


@pytest.mark.parametrize("path,line,target", links(), ids=lambda v: str(v) if not isinstance(v, Path) else
                         str(v.relative_to(REPO)))
def test_link_resolves(path, line, target):
    why = problem(path, target)
    assert not why, f"{path.relative_to(REPO)}:{line}: [{target}] {why}"


def test_operations_names_everything_the_docker_context_keeps():
    """docs/operations.md lists what .dockerignore lets into the build
    context; a path added there must be named in the docs too."""
    kept = [line[1:].strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    text = (REPO / "docs" / "operations.md").read_text()
    section = text[text.index("## Docker sidecar"):]
    section = section[:section.index("###")]
    missing = [path for path in kept if f"`{path}`" not in section and f"`{path}/`" not in section]
    assert kept and not missing, f"docs/operations.md, Docker sidecar, does not name {missing}"
