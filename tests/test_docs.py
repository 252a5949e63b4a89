"""The README is a landing page and docs/ holds the reference: README.md stays short, links
every docs page, and every relative link (and #anchor) in README.md, BENCHMARKS.md and
docs/*.md resolves.
Plain text parsing, no JAX."""
import glob
import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")  # stays at the root; linked from the docs
MAX_README_LINES = 300
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _prose_lines(text):
    """The lines outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _,
    spaces -> -. Inline-code backticks and link syntax are punctuation too."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    kept = "".join(c for c in text
                   if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a page, with GitHub's -1, -2 ... suffixes for repeats."""
    seen, out = {}, set()
    for line in _prose_lines(_read(path)):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path):
    """The link targets of a page's prose (code spans and fenced blocks are not links)."""
    for line in _prose_lines(_read(path)):
        line = re.sub(r"`[^`]*`", "x", line)
        yield from LINK.findall(line)


def relative_links(path):
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        yield target


def test_readme_is_a_landing_page():
    n = len(_read(README).splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


def test_there_are_docs_pages():
    assert len(PAGES) >= 10, PAGES


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(os.path.join(ROOT, t.split("#")[0]))
              for t in relative_links(README) if t.split("#")[0]}
    missing = [os.path.relpath(p, ROOT) for p in PAGES if os.path.normpath(p) not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", [README, BENCHMARKS] + PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(dest):
            broken.append(f"{target}: no file {os.path.relpath(dest, ROOT)}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert not broken, f"{os.path.relpath(page, ROOT)}: " + "; ".join(broken)


def test_slug_follows_githubs_rule():
    assert slug("A CPU-hour model (`m6.py:cpu_hour`)") == "a-cpu-hour-model-m6pycpu_hour"
    assert slug("MoE at paper scale: routing groups, priority, dropless") == \
        "moe-at-paper-scale-routing-groups-priority-dropless"
    assert slug("What a run writes (`--workdir=DIR`)") == "what-a-run-writes---workdirdir"


def test_the_quickstart_block_is_still_the_first_after_its_heading():
    """What .ci/run and ../shared/tools/quickstart.py read: two commands, the second the
    default test suite."""
    text = _read(README)
    m = re.search(r"^#+[^\n]*quick\s*start[^\n]*\n.*?^```[^\n]*\n(.*?)^```", text,
                  re.I | re.M | re.S)
    assert m, "no fenced block after a 'quick start' heading"
    cmds = [l.strip() for l in m.group(1).splitlines()
            if l.strip() and not l.strip().startswith("#")]
    assert len(cmds) == 2 and cmds[1].endswith("python -m pytest -q"), cmds
