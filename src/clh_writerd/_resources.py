"""Files that ship with the package: the guides and the reference config.

A wheel carries them as the data packages ``clh_writerd/docs`` (the checkout's
``docs/``) and ``clh_writerd/reference`` (the checkout's ``daemon/``);
pyproject.toml maps those directories there, so each file has one copy in the
repository. A checkout or an editable install reads them where they live.
"""

import os
from typing import Dict, Tuple

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# src/clh_writerd -> the repository root, for a checkout or an editable install.
_CHECKOUT = os.path.dirname(os.path.dirname(_PACKAGE))
# Name inside the installed package -> directory of the checkout.
_SOURCES = {"docs": "docs", "reference": "daemon"}

REFERENCE_CONFIG = "clh-writerd.toml"


def data_dir(name: str) -> str:
    """The directory holding the shipped files ``name`` ("docs" or "reference")."""
    for candidate in (os.path.join(_PACKAGE, name), os.path.join(_CHECKOUT, _SOURCES[name])):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"clh-writerd was installed without its {name!r} files (looked in {_PACKAGE})")


def reference_config() -> str:
    """The commented reference config: every key, its default and what it does."""
    with open(os.path.join(data_dir("reference"), REFERENCE_CONFIG), encoding="utf-8") as f:
        return f.read()


def doc_pages() -> Dict[str, str]:
    """Guide name (``operations`` for operations.md) -> path, sorted by name."""
    folder = data_dir("docs")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".md"))
    return {n[: -len(".md")]: os.path.join(folder, n) for n in names}


def doc_title(path: str) -> str:
    """The first Markdown heading of a page, without its '#'."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return ""


def _markers(name: str) -> Tuple[str, str]:
    return f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"


def generated_block(text: str, name: str) -> str:
    """What is between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``text`` (a generated table)."""
    start, end = _markers(name)
    if start not in text or end not in text:
        raise ValueError(f"no {name} block ({start.strip()} ... {end})")
    return text.split(start, 1)[1].split(end, 1)[0]


def replace_block(path: str, name: str, content: str) -> None:
    """Rewrite what is between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = _markers(name)
    old = start + generated_block(text, name) + end
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, start + content + end, 1))
