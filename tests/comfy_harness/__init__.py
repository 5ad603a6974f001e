"""Test harness for running PhotoOps inside a real ComfyUI.

Modules:
  fixtures  - seeded random-weight SD1.5-format checkpoint (+ matching diffusers UNet)
  comfyenv  - make ComfyUI importable in-process (sys.path + torchvision placeholder)
  server    - start/stop a headless ComfyUI with the pack loaded; HTTP helpers
  convert   - UI-format workflow -> API-format prompt converter

The package is deliberately *not* called ``comfy``: ComfyUI's own ``comfy`` is a
namespace package, and a ``tests/comfy`` folder on sys.path would merge into
(or shadow) it.
"""
