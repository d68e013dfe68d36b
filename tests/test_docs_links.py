"""Every relative link in README.md and docs/*.md points at a file of the repository, and every #anchor at a
heading of the page it names (GitHub's heading ids). Pure Python: reads the Markdown files, imports no JAX."""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Pages written on other branches that the README already lists; they exist once those branches are merged.
# Remove a name here as soon as its file is in the repository.
PENDING = {"docs/testing.md", "docs/gpu.md", "docs/train_performance.md"}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def pages():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _prose(text: str) -> str:
    """The text without code blocks and code spans (a link there is an example, not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: pathlib.Path) -> set:
    """GitHub's ids of the page's headings: lower case, punctuation dropped, spaces to hyphens, -1, -2, ... for
    repeats."""
    seen, ids = {}, set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def broken_links():
    bad = []
    for page in pages():
        for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):        # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists():
                if rel not in PENDING:
                    bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor} in {rel})")
    return bad


def test_every_relative_link_resolves():
    assert broken_links() == []


def test_the_checker_sees_a_broken_link(tmp_path, monkeypatch):
    """The checker itself: a page with a missing file and a missing anchor gives exactly those two errors."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some section (x)\n", encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#some-section-x) [web](https://example.org/x.md) `[code](nope.md)`\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#title-2)\n```\n[fenced](nope.md)\n```\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert broken_links() == ["README.md: docs/b.md (no such file)",
                              "README.md: docs/a.md#title-2 (no heading #title-2 in docs/a.md)"]


DOC_CITATION = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")


def test_code_cites_existing_doc_sections():
    """Every ``docs/PAGE.md#anchor`` a docstring or comment of the package (or sample.py / train.py) cites names a
    page of the repository and one of its headings; the package cites no document outside the repository."""
    bad, cited = [], 0
    for path in sorted((ROOT / "bagel_jax").rglob("*.py")) + [ROOT / "sample.py", ROOT / "train.py"]:
        text = path.read_text(encoding="utf-8")
        for page, anchor in DOC_CITATION.findall(text):
            cited += 1
            dest = ROOT / "docs" / page
            if not dest.exists():
                bad.append(f"{path.relative_to(ROOT)}: docs/{page} (no such file)")
            elif anchor and anchor not in anchors(dest):
                bad.append(f"{path.relative_to(ROOT)}: docs/{page}#{anchor} (no such heading)")
    assert bad == []
    assert cited > 20          # the docstrings do cite the architecture page
