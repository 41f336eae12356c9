"""mkdocs hooks for tokenreduce's documentation (``hooks:`` in mkdocs.yml).

The navigation in mkdocs.yml names every page the site should have. Pages are written by different people at
different times, so a page that does not exist yet is dropped from the navigation (with an INFO line naming it)
instead of failing ``mkdocs build --strict``; a section left empty disappears. An entry whose target ends in "/"
(``Benchmarks: benchmarks/``) becomes one entry per Markdown page in that folder, titled by its first heading.

Pages are also read on GitHub, where a link such as ``[configs/default_eval.yaml](../configs/default_eval.yaml)``
to a file of the repository outside ``docs/`` works. mkdocs cannot serve such files, so those links (to files
that exist) become links to ``repo_url`` (``<repo_url>/blob/<edit branch>/<path>``) when mkdocs.yml sets one,
and plain code text otherwise. Broken links inside ``docs/`` are left alone, so ``--strict`` still reports them.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, List, Optional

log = logging.getLogger("mkdocs.hooks.tokenreduce")


def _title(page: Path) -> str:
    for line in page.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#\s+(.+)", line)
        if m:
            return m.group(1).strip()
    return page.stem.replace("_", " ").capitalize()


def _filter(items: List[Any], docs: Path, missing: List[str]) -> List[Any]:
    out: List[Any] = []
    for item in items:
        if isinstance(item, str):
            item = {None: item}
        (title, target), = item.items()
        if isinstance(target, list):
            children = _filter(target, docs, missing)
            if children:
                out.append({title: children})
        elif isinstance(target, str) and re.match(r"[a-z]+://", target):
            out.append(item)
        elif isinstance(target, str) and target.endswith("/"):
            folder = docs / target
            pages = sorted(folder.glob("*.md")) if folder.is_dir() else []
            index = [p for p in pages if p.stem in ("index", "README")]
            pages = index + [p for p in pages if p not in index]
            if pages:
                out.append({title: [{_title(p): str(p.relative_to(docs))} for p in pages]})
            else:
                missing.append(target)
        elif (docs / target).is_file():
            out.append(item if title is not None else target)
        else:
            missing.append(target)
    return out


_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)", re.M)


def _outside_link(match: "re.Match[str]", page_dir: Path, docs: Path, root: Path, repo_url: str,
                  branch: str) -> str:
    text, target = match.group(1), match.group(2)
    if re.match(r"[a-z]+:|#|/", target):
        return match.group(0)
    path_part, _, anchor = target.partition("#")
    resolved = (page_dir / path_part).resolve()
    try:
        resolved.relative_to(docs.resolve())
        return match.group(0)  # inside docs/: mkdocs checks it
    except ValueError:
        pass
    try:
        rel = resolved.relative_to(root.resolve())
    except ValueError:
        return match.group(0)
    if not resolved.exists():
        return match.group(0)
    if repo_url:
        kind = "tree" if resolved.is_dir() else "blob"
        return f"[{text}]({repo_url.rstrip('/')}/{kind}/{branch}/{rel.as_posix()}{'#' + anchor if anchor else ''})"
    return text if text.startswith("`") else f"`{text}`"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """Links to repository files outside docs/ -> repo_url links, or code text without a repo_url."""
    docs = Path(config["docs_dir"])
    root = Path(config["config_file_path"]).parent
    page_dir = (docs / page.file.src_path).parent
    repo_url = config.get("repo_url") or ""
    edit_uri = config.get("edit_uri") or ""
    branch = edit_uri.strip("/").split("/")[1] if edit_uri.strip("/").startswith("edit/") else "main"
    parts = _FENCE.split(markdown)
    # re.split with one group: [text, fence, text, fence, ...]; odd text chunks are inside code fences
    out, inside = [], False
    for i, chunk in enumerate(parts):
        if i % 2 == 1:
            out.append(chunk)
            inside = not inside
            continue
        out.append(chunk if inside else _LINK.sub(
            lambda m: _outside_link(m, page_dir, docs, root, repo_url, branch), chunk))
    return "".join(out)


def on_config(config: Any, **kwargs: Any) -> Optional[Any]:
    nav = config.get("nav")
    if not nav:
        return config
    docs = Path(config["docs_dir"])
    missing: List[str] = []
    config["nav"] = _filter(nav, docs, missing)
    if missing:
        log.info("pages in mkdocs.yml's nav that do not exist yet (left out): %s", ", ".join(missing))
    return config
