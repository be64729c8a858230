"""The README and docs/: short README, quick start and OpenGait commands near the top, links that resolve.

Relative links must point at files that exist, and a link's ``#anchor`` at a heading of the target
Markdown file (GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, ``-1``,
``-2`` ... for repeated headings). Code blocks and inline code are not read for links.
"""
import re
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

README_MAX_LINES = 250
TOP_LINES = 150

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def _pages() -> List[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def _outside_code(text: str) -> List[str]:
    """The lines of ``text`` outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's id for a heading's text (before the ``-1`` suffix of repeats)."""
    text = _INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)  # keeps letters, digits, _, - and spaces
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Every heading id of the Markdown file at ``path``."""
    seen: Dict[str, int] = {}
    out = set()
    for line in _outside_code(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> List[str]:
    """Every link target in ``path`` outside code."""
    out = []
    for line in _outside_code(path.read_text(encoding="utf-8")):
        out.extend(_LINK.findall(_INLINE_CODE.sub("", line)))
    return out


def broken_links(pages: List[Path]) -> List[str]:
    broken = []
    for page in pages:
        for target in links(page):
            if "://" in target or target.startswith("mailto:"):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name} -> {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading with that id in {dest.name}")
    return broken


def test_relative_links_and_anchors_resolve():
    broken = broken_links(_pages())
    assert not broken, broken


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Known limits\n\n## Known limits\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#known-limits) [ok](a.md#known-limits-1) [ok](#b)\n\n# B\n\n"
                    "[gone](c.md) [bad anchor](a.md#known-limit)\n\n```\n[in code](d.md)\n```\n`[inline](e.md)`\n",
                    encoding="utf-8")
    broken = broken_links([page])
    assert [b.split(" -> ")[1] for b in broken] == ["c.md: no such file",
                                                      "a.md#known-limit: no heading with that id in a.md"]


def test_github_heading_ids():
    assert slug("`quant.calibrate`: post-training quantization") == "quantcalibrate-post-training-quantization"
    assert slug("Not done / limits") == "not-done--limits"
    assert slug('What "seeded" reproduces') == "what-seeded-reproduces"
    assert slug("CPUs without VNNI (AVX2 only)") == "cpus-without-vnni-avx2-only"
    assert slug("snake_case [link](x.md)") == "snake_case-link"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (move the rest to docs/)"


def test_quick_start_and_opengait_commands_are_near_the_top_of_the_readme():
    top = "\n".join(README.read_text(encoding="utf-8").splitlines()[:TOP_LINES])
    for command in ("make demo", "make test"):
        assert re.search(rf"^{command}\b", top, re.M), \
            f"`{command}` is not a command line in README's first {TOP_LINES} lines"
    assert re.search(r"^(qgait|torchrun .*-m qgait_plugin) opengait (train|test|calibrate|export)\b", top, re.M), \
        f"no `qgait opengait ...` command line in README's first {TOP_LINES} lines"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), f"the README's `make {target}` has no Makefile target"


def test_docs_has_pages_and_the_readme_links_each():
    pages = [p for p in sorted(DOCS.glob("*.md")) if p.name != "README.md"]
    assert len(pages) >= 4, [p.name for p in pages]
    readme_links = {t.partition("#")[0] for t in links(README)}
    orphans = [p.name for p in pages if f"docs/{p.name}" not in readme_links]
    assert not orphans, f"docs pages the README does not link to: {orphans}"
