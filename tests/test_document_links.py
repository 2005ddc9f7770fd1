"""Every relative link in the README and docs/ points at a file that exists, and every
`#anchor` at a heading of its target, slugged as GitHub slugs headings."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters,
    spaces and hyphens kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    """The anchors of a document's headings (outside code blocks); a repeated heading's
    later copies get `-1`, `-2`, ... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in HEADING.findall(FENCE.sub("", document.read_text())):
        base = slug(heading)
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(document: Path) -> list[str]:
    return [target for target in LINK.findall(FENCE.sub("", document.read_text()))
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto:


def test_slug_follows_github():
    assert slug("Dashboard: `python -m moa.dashboard`") == "dashboard-python--m-moadashboard"
    assert slug("schemes_mqar: every scheme at 64/4") == "schemes_mqar-every-scheme-at-644"
    assert slug("Router (`router` group, `moa/layers/router.py`)") == \
        "router-router-group-moalayersrouterpy"


def test_the_documents_have_links_to_check():
    assert sum(len(links(document)) for document in DOCUMENTS) > 10
    assert any("#" in target for document in DOCUMENTS for target in links(document))


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_relative_links_resolve(document):
    broken = []
    for target in links(document):
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT)}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading in {file.relative_to(ROOT)} has this anchor")
    assert not broken, f"{document.name}: " + "; ".join(broken)
