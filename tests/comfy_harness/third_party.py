"""Which shipped workflows need a third-party node pack: the one rule the tests route them by.

``tests/test_comfy_integration.py`` and ``tests/test_browser.py`` run / load every
``workflows/*.json`` in a server with ComfyUI core and this pack only, so they skip the files
:func:`required_packs` names a pack for; ``tests/test_comfy_ipadapter.py`` runs those with the
pack loaded.  A workflow needs a pack when one of its node types is in that pack's list below
(read from the pack's source in ``$COMFYUI_DIR/custom_nodes``, :func:`pack_node_types`).  A third-party node type
missing from this table is not skipped: the core-only tests then fail on it loudly
("unknown node type"), they never pass it silently.
"""
from __future__ import annotations

import ast
import functools
import json
import os
from pathlib import Path

#: The third-party packs our workflows may use (custom_nodes folder names).
PACKS = ("ComfyUI_IPAdapter_plus",)


@functools.lru_cache(maxsize=None)
def pack_node_types(pack: str) -> frozenset:
    """The node types ``pack`` registers: the string keys of every ``NODE_CLASS_MAPPINGS = {...}``
    literal in its top-level ``.py`` files, read (AST, never imported) from
    ``$COMFYUI_DIR/custom_nodes/<pack>``; empty when that folder is not there (the ComfyUI tests skip
    then)."""
    comfy = os.environ.get("COMFYUI_DIR")
    folder = Path(comfy) / "custom_nodes" / pack if comfy else None
    if folder is None or not folder.is_dir():
        return frozenset()
    names = set()
    for py in sorted(folder.glob("*.py")):
        try:
            tree = ast.parse(py.read_text(errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NODE_CLASS_MAPPINGS"
                                                    for t in node.targets) and isinstance(node.value, ast.Dict):
                names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return frozenset(names)


def _load(wf) -> dict:
    return json.loads(Path(wf).read_text()) if isinstance(wf, (str, Path)) else wf


def required_packs(wf) -> set[str]:
    """Third-party packs (custom_nodes folder names) a UI-format workflow (dict or path) needs."""
    types = {n.get("type") for n in _load(wf).get("nodes", [])}
    return {pack for pack in PACKS if types & pack_node_types(pack)}


def core_only(paths) -> list[Path]:
    """The workflows of ``paths`` that run with ComfyUI core and this pack alone."""
    return [Path(p) for p in paths if not required_packs(p)]


def needing(pack: str, paths) -> list[Path]:
    """The workflows of ``paths`` that need ``pack``."""
    return [Path(p) for p in paths if pack in required_packs(p)]
