"""mkdocs hooks: links to repository files outside docs/.

Links. Pages link results files and examples relative to themselves (`../../bench/results/train_step.json`
from docs/benchmarks/), which is how GitHub resolves them. mkdocs only knows docs/, so this hook
copies each linked repository file into the site at its repository path, rewrites the link to that
copy, and fails the build (also without --strict) when a link points at something that is not a
file of the repository: a results file renamed or removed breaks `make docs`.
Docstrings are parsed by mkdocstrings in the Google style; one it cannot parse is a warning, which
--strict turns into a failed build.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File



# Inline Markdown links and images: ](target) or ](target#anchor); targets without spaces.
LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _outside_links(page: Path, docs: Path, root: Path):
    """(match, repository path) of each link in `page` that leaves docs/; raises for a missing target."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for match in LINK.finditer(text):
        target = match.group("target")
        if "://" in target or target.startswith(("mailto:", "/")):
            continue
        resolved = Path(os.path.normpath(page.parent / target))
        if resolved == docs or docs in resolved.parents:
            continue  # inside docs/: mkdocs validates it
        if root not in resolved.parents or not resolved.is_file():
            raise PluginError(f"{page.relative_to(root)}: link to {target}, which is not a file of the repository")
        yield target, resolved.relative_to(root).as_posix()


def on_files(files, config):
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    present = {file.src_uri for file in files}
    for page in sorted(docs.rglob("*.md")):
        for _, repo_path in _outside_links(page, docs, root):
            if repo_path.endswith(".md"):
                raise PluginError(f"{page.relative_to(root)}: link to {repo_path}: link a documentation page instead")
            if repo_path in present:
                continue
            if (docs / repo_path).exists():
                raise PluginError(f"{repo_path} exists both in docs/ and in the repository")
            files.append(File(repo_path, src_dir=str(root), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
            present.add(repo_path)
    return files


def on_page_markdown(markdown, page, config, files):
    docs = Path(config["docs_dir"]).resolve()
    source = docs / page.file.src_uri
    rewrites = dict(_outside_links(source, docs, docs.parent))
    if not rewrites:
        return markdown
    here = Path(page.file.src_uri).parent

    def rewrite(match: re.Match) -> str:
        target = match.group("target")
        if target not in rewrites:
            return match.group(0)
        return f"]({os.path.relpath(rewrites[target], here).replace(os.sep, '/')}{match.group('anchor') or ''})"

    return LINK.sub(rewrite, markdown)
