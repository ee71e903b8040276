"""The documentation site: it builds with ``mkdocs build --strict`` (no broken link or anchor, every page in
the nav, every ``::: module`` resolvable), and every registered method has its page, listed in the nav and
in the methods overview."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdzoo.methods import list_methods
from tests.conftest import REPO_ROOT

METHOD_PAGES = REPO_ROOT / "docs" / "methods"
# Methods that share a page with a sibling (one file documents both).
SHARED_PAGES = {"kd_ls": "logit_std", "dkd_ls": "logit_std", "mlkd_ls": "mlkd"}
# Pages for things that are not registered methods: DOT is an optimiser (optim.name=dot).
EXTRA_PAGES = {"dot.md"}


def method_page(name: str) -> Path:
    return METHOD_PAGES / f"{SHARED_PAGES.get(name, name)}.md"


def documented_pages() -> list[str]:
    return sorted({method_page(name).name for name in list_methods()} | EXTRA_PAGES)


def test_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs tools are in the 'docs' and 'test' extras")
    pytest.importorskip("mkdocstrings", reason="the docs tools are in the 'docs' and 'test' extras")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    for page in ("index.html", "design/index.html", "config/index.html", "models/index.html",
                 "methods/index.html", "methods/dkd/index.html", "methods/dot/index.html", "api/index.html"):
        assert (site / page).is_file(), f"{page} was not built"
    # A `::: module` block that resolves to nothing renders an empty section, so look for a rendered member.
    assert "compute_losses" in (site / "api" / "index.html").read_text()


def test_every_registered_method_has_a_page() -> None:
    missing = sorted(str(method_page(name).relative_to(REPO_ROOT)) for name in list_methods()
                     if not method_page(name).is_file())
    missing += [f"docs/methods/{page}" for page in sorted(EXTRA_PAGES) if not (METHOD_PAGES / page).is_file()]
    assert not missing, (
        f"documentation pages missing: {missing}; add docs/methods/<name>.md, list it in mkdocs.yml's nav and "
        "in docs/methods/index.md"
    )


def test_every_method_page_is_in_the_nav_and_the_overview() -> None:
    nav = (REPO_ROOT / "mkdocs.yml").read_text()
    overview = (METHOD_PAGES / "index.md").read_text()
    assert [page for page in documented_pages() if f"methods/{page}" not in nav] == []
    assert [page for page in documented_pages() if f"({page})" not in overview] == []
