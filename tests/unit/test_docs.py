"""The documentation stays true: every metric is documented, and every relative link in README.md,
CONTRIBUTING.md and docs/ leads to a file and heading that exist. (The configuration reference is generated:
test_config_reference.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ..support import REPO

DOCS = REPO / "docs"


def _table(doc: Path, after_heading: str) -> list[list[str]]:
    section = doc.read_text().split(after_heading + "\n", 1)[1]
    rows: list[list[str]] = []
    for line in section.splitlines():
        if line.startswith("## ") and rows:
            break
        if line.startswith("| `"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_every_metric_is_documented():
    from prometheus_client import REGISTRY

    from inventory_worker import metrics  # noqa: F401

    exported = {f.name for f in REGISTRY.collect() if f.name.startswith("inventory_")}
    rows = _table(DOCS / "operations.md", "## Metrics")
    documented = {re.sub(r"_total$", "", re.findall(r"`([^`]+)`", r[0])[0]) for r in rows}
    assert documented == exported


# ==== links =======================================================================================

MARKDOWN = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading ids: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"(?ms)^```.*?^```", "", doc.read_text())
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"(?m)^#{1,6} (.+)$", text)
    }


def _links(doc: Path) -> list[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", doc.read_text())  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_link_check_sees_links():
    assert "docs/configuration.md" in _links(REPO / "README.md")
    assert "surviving-the-worst-day-the-chaos-suite" in _anchors(DOCS / "chaos.md")


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in _links(doc):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that id")
    assert broken == []
