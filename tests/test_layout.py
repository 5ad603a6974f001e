"""The pack's architecture rules, read from the source (AST), no ComfyUI needed.

* ``kernels/`` imports no ``comfy`` / ``folder_paths`` / ``server`` (plain torch);
* every ``comfy.*`` / ``folder_paths`` / ``server`` import of the shipped pack is in ``nodes/comfy/``
  (node files reach ComfyUI through it; ``comfy_api`` for the V3 node classes aside);
* ``nodes/comfy/`` modules open with a docstring, stay near 300 lines, and import each other
  without a cycle; node files stay under 450 lines;
* test-only helpers are not shipped;
* every file save in the pack goes through ``kernels/files.py`` (no other ``save_file``).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_ROOTS = ("comfy", "folder_paths", "server", "nodes", "comfy_extras", "latent_preview")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield 0, a.name
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


def _pack_files(*parts):
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def test_kernels_import_no_comfy():
    bad = [(p.name, m) for p in _pack_files("kernels") for lvl, m in _imports(p)
           if lvl == 0 and m.split(".")[0] in COMFY_ROOTS]
    assert not bad, bad


def test_comfy_imports_live_in_nodes_comfy():
    bad = []
    for p in _pack_files("nodes"):
        if "comfy" in p.relative_to(ROOT / "nodes").parts[:-1]:
            continue
        for lvl, m in _imports(p):
            if lvl == 0 and m.split(".")[0] in COMFY_ROOTS:
                bad.append((p.name, m))
    assert not bad, f"node files importing ComfyUI directly (go through nodes/comfy/): {bad}"
    assert not (ROOT / "nodes" / "comfy_adapter.py").exists()


def test_adapter_modules_are_small_documented_and_acyclic():
    mods = {p.stem: p for p in _pack_files("nodes", "comfy")}
    assert {"models", "attention", "text", "sampling", "files"} <= set(mods)
    graph = {}
    for name, p in mods.items():
        tree = ast.parse(p.read_text())
        assert ast.get_docstring(tree), f"nodes/comfy/{p.name} has no module docstring"
        n = len(p.read_text().splitlines())
        assert n <= 320, f"nodes/comfy/{p.name} has {n} lines"
        graph[name] = {m.split(".")[0] for lvl, m in _imports(p) if lvl == 1 and m}
    seen, stack = set(), []

    def visit(n):
        assert n not in stack, f"import cycle: {' -> '.join(stack + [n])}"
        if n in seen:
            return
        stack.append(n)
        for d in graph.get(n, ()):
            if d in graph:
                visit(d)
        stack.pop()
        seen.add(n)

    for n in graph:
        visit(n)


def test_node_files_stay_small():
    for p in _pack_files("nodes"):
        n = len(p.read_text().splitlines())
        assert n <= 450, f"{p.relative_to(ROOT)} has {n} lines"


def test_test_only_code_is_not_shipped():
    names = {"ComfyDenoiser", "ProbeGuider", "lookup_embedding", "load_clip_vision_any", "CLIPVisionLoaderAnyNode"}
    for p in _pack_files("nodes") + _pack_files("kernels"):
        tree = ast.parse(p.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not (defined & names), (p.name, defined & names)


def test_every_save_goes_through_the_one_helper():
    for p in _pack_files("nodes") + _pack_files("kernels") + [ROOT / "tools" / "convert_pops.py"]:
        if p.name == "files.py" and p.parent.name == "kernels":
            continue
        src = p.read_text()
        for bad in ("save_file(", "torch.save(", "os.replace("):
            assert bad not in src, f"{p.relative_to(ROOT)} writes with {bad} (use kernels/files.py)"


def test_registry_metadata_is_consistent():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    proj, comfy = meta["project"], meta["tool"]["comfy"]
    assert proj["license"]["text"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert comfy["Icon"].endswith("web/icon.png") and (ROOT / "web" / "icon.png").exists()
    assert not any("CUDA" in c for c in proj["classifiers"])
    reqs = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert reqs == proj["dependencies"], (reqs, proj["dependencies"])
    ignored = (ROOT / ".comfyignore").read_text().split()
    assert {"tests/", "bench/", "tools/toyworld/"} <= set(ignored)


def test_runtime_requirements_are_what_the_shipped_nodes_import():
    """Every third-party module the shipped pack imports is torch (ComfyUI's) or a listed requirement;
    diffusers / transformers (tests, library use) are not imported by the shipped code."""
    import sys

    reqs = {ln.split(">")[0].split("=")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")}
    allowed = reqs | {"torch", "comfy_api"} | set(COMFY_ROOTS) | set(sys.stdlib_module_names)
    found = {}
    for p in _pack_files("nodes") + _pack_files("kernels") + [ROOT / "__init__.py"]:
        for lvl, m in _imports(p):
            if lvl == 0 and m:
                found.setdefault(m.split(".")[0], p.name)
    extra = {m: f for m, f in found.items() if m not in allowed}
    assert not extra, f"shipped code imports packages that are not requirements: {extra}"
    assert "diffusers" not in found and "transformers" not in found
