"""Every document the README (and the other docs in the repository) links or names is inside the
repository and exists: a clone is the whole documentation, nothing points at a folder beside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    {
        ROOT / "README.md",
        ROOT / "ARCHITECTURE.md",
        ROOT / "CONTRIBUTING.md",
        *ROOT.glob("services/*/README.md"),
        *ROOT.glob("gateway/README.md"),
        *ROOT.glob("deploy/README.md"),
    }
)
# [text](target) with a relative target; web links and in-page anchors are not files.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A document named in code style: `path/to/NAME.md` (a glob such as `services/*/README.md` too).
NAMED = re.compile(r"`([^`\s]+\.md)`")


def _relative_targets(text: str) -> list[str]:
    targets = [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", t)]
    return [t.split("#", 1)[0] for t in targets]


def _resolves_inside(doc: Path, target: str) -> bool:
    for base in (doc.parent, ROOT):
        pattern = (base / target).resolve()
        matches = list(base.glob(target)) if "*" in target else ([pattern] if pattern.exists() else [])
        if matches and all(m.resolve().is_relative_to(ROOT) for m in matches):
            return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_linked_and_named_documents_exist_inside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    targets = [*_relative_targets(text), *NAMED.findall(text)]
    broken = [t for t in targets if not _resolves_inside(doc, t)]
    assert broken == [], f"{doc.relative_to(ROOT)} points at documents outside the repository or missing: {broken}"


def test_the_readme_links_the_architecture_document() -> None:
    assert "ARCHITECTURE.md" in _relative_targets((ROOT / "README.md").read_text(encoding="utf-8"))


def test_a_link_outside_the_repository_is_refused() -> None:
    # The check itself: the README once named `../shared/DESIGN.md`, beside the clone.
    assert not _resolves_inside(ROOT / "README.md", "../shared/DESIGN.md")
    assert _resolves_inside(ROOT / "README.md", "services/*/README.md")
