"""The documentation: the generated CLI reference is current, the API page covers the public names,
every page is in the site's nav, and the README's links resolve. Cheap: no model, no mkdocs build
(`make docs` builds the site with --strict)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pipeline

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "scripts"))

import cli_reference  # noqa: E402


def test_cli_reference_is_generated_from_the_typer_app():
    committed = cli_reference.REFERENCE.read_text(encoding="utf-8")
    assert committed == cli_reference.fresh(), (
        "docs/reference/cli.md differs from what the typer app in cli.py generates: "
        "run `make cli-reference` (python scripts/cli_reference.py) and commit the result"
    )


def test_api_page_documents_every_public_name():
    page = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: pipeline\.(?:\w+\.)*(\w+)\s*$", page, re.M))
    missing = sorted(set(pipeline.__all__) - documented - {"__version__"})
    assert not missing, f"docs/reference/api.md has no `::: pipeline.<module>.<name>` for {missing}"


def test_every_page_is_in_the_nav():
    nav = set(re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M))
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


def test_readme_is_a_front_page_with_working_links():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150, "README.md is the front page: move details into docs/"
    assert "make test" in readme, "README.md must say how the tests run (CI runs `make test`)"
    targets = [t for t in re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", readme) if "://" not in t]
    assert targets, "README.md links into docs/ and bench/results/"
    broken = [t for t in targets if not (ROOT / t).exists()]
    assert not broken, f"README.md links to missing files: {broken}"
