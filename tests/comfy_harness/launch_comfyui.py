"""Start ComfyUI's main.py, with a torchvision placeholder when needed.

    python launch_comfyui.py COMFYUI_DIR [main.py arguments...]

Equivalent to ``cd COMFYUI_DIR && python main.py ARGS``, except that when
$PHOTOOPS_TORCHVISION_PLACEHOLDER names a folder, that folder goes first on
sys.path (it holds a two-file ``torchvision`` package; see comfyenv.py) and
transformers is kept from mistaking the placeholder for a real torchvision:
transformers caches ``is_torchvision_available()`` from ``find_spec``, and a
True there breaks ``import diffusers`` models (they pull in torchvision
transforms through transformers).  A meta-path hook waits until
``transformers.utils.import_utils`` is imported, then evaluates those checks
with the placeholder hidden, so the cached answer is False.  Nothing is
imported early, so ComfyUI's own start-up order (torch after main.py's setup)
is unchanged.

This file must stay self-contained: its folder is removed from sys.path
before main.py runs (it holds modules named ``server`` and ``convert``).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import runpy
import sys

_TV_CHECKS = ("is_torchvision_available", "is_torchvision_v2_available")


def _is_placeholder(mod, placeholder: str | None) -> bool:
    if getattr(mod, "__photoops_placeholder__", False):
        return True
    f = getattr(mod, "__file__", None) or ""
    return bool(placeholder) and os.path.realpath(f).startswith(os.path.realpath(placeholder) + os.sep)


def evaluate_checks_hidden(tiu, placeholder: str | None) -> None:
    """Run transformers' cached torchvision checks with ``placeholder`` hidden."""
    saved_path = list(sys.path)
    hidden = {
        k: v
        for k, v in sys.modules.items()
        if (k == "torchvision" or k.startswith("torchvision.")) and _is_placeholder(v, placeholder)
    }
    try:
        if placeholder:
            real = os.path.realpath(placeholder)
            sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != real]
        for k in hidden:
            del sys.modules[k]
        importlib.invalidate_caches()
        for name in _TV_CHECKS:
            fn = getattr(tiu, name, None)
            if fn is None:
                continue
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()
            try:
                fn()
            except Exception:
                pass
    finally:
        sys.path[:] = saved_path
        sys.modules.update(hidden)
        importlib.invalidate_caches()


class _AfterImportHook(importlib.abc.MetaPathFinder):
    """Call ``callback(module)`` right after module ``target`` executes (once)."""

    def __init__(self, target: str, callback):
        self.target = target
        self.callback = callback
        self.done = False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target or self.done:
            return None
        self.done = True
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        callback = self.callback

        def exec_and_hook(module):
            exec_module(module)
            callback(module)

        spec.loader.exec_module = exec_and_hook
        return spec


def install_transformers_guard(placeholder: str) -> None:
    """Make transformers cache 'no torchvision' despite ``placeholder`` on sys.path."""
    mod = sys.modules.get("transformers.utils.import_utils")
    if mod is not None:
        evaluate_checks_hidden(mod, placeholder)
        return
    sys.meta_path.insert(
        0, _AfterImportHook("transformers.utils.import_utils", lambda m: evaluate_checks_hidden(m, placeholder))
    )


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: launch_comfyui.py COMFYUI_DIR [main.py args...]")
    comfy_dir = os.path.abspath(argv[1])
    main_py = os.path.join(comfy_dir, "main.py")
    # Replace this script's folder (sys.path[0]) by the ComfyUI folder, as
    # `python main.py` would have it.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, comfy_dir)
    placeholder = os.environ.get("PHOTOOPS_TORCHVISION_PLACEHOLDER")
    if placeholder:
        sys.path.insert(0, placeholder)
        install_transformers_guard(placeholder)
    os.chdir(comfy_dir)
    sys.argv = [main_py] + argv[2:]
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
