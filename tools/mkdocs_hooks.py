"""mkdocs hooks for tokenreduce's documentation (``hooks:`` in mkdocs.yml).

The navigation in mkdocs.yml names every page the site should have. Pages are written by different people at
different times, so a page that does not exist yet is dropped from the navigation (with an INFO line naming it)
instead of failing ``mkdocs build --strict``; a section left empty disappears. An entry whose target ends in "/"
(``Benchmarks: benchmarks/``) becomes one entry per Markdown page in that folder, titled by its first heading.
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
