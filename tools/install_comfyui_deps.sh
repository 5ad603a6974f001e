#!/usr/bin/env bash
# Install a ComfyUI checkout's Python requirements into the *current* python's
# environment, CPU-only, without replacing torch (see
# docs/comfyui-integration.md §10.1).
#
#   usage: tools/install_comfyui_deps.sh COMFYUI_DIR
#   env:   PYTHON   interpreter whose environment receives the packages
#                   (default: python3 on PATH, i.e. the active venv)
#          TORCH_PIN   torch version to hold (default: the installed torch,
#                   else 2.13.0)
#
# What it does:
#   * reads COMFYUI_DIR/requirements.txt and drops torch, torchvision,
#     torchaudio and spandrel (no torchvision wheel imports beside the CPU
#     torch; spandrel needs a real torchvision);
#   * pins torch through a constraints file so no requirement drags the
#     CUDA build in;
#   * adds `requests` (imported by app/frontend_management.py, missing from
#     requirements.txt).
# ComfyUI then needs a torchvision placeholder on PYTHONPATH to start; the
# test harness (tests/comfy/server.py) writes one when needed.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 COMFYUI_DIR" >&2
    exit 2
fi
comfy_dir=$1
req="$comfy_dir/requirements.txt"
if [ ! -f "$req" ]; then
    echo "error: $req not found (is $comfy_dir a ComfyUI checkout?)" >&2
    exit 1
fi
py=${PYTHON:-python3}

if [ -z "${TORCH_PIN:-}" ]; then
    TORCH_PIN=$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo 2.13.0)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Keep every requirement except the excluded packages (match the name before
# any version specifier, extras or marker; comments and blanks go too).
grep -v -E '^[[:space:]]*(#|$)' "$req" \
    | grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio|spandrel)[[:space:]]*([<>=!~;#@\[]|$)' \
    > "$work/requirements.txt"
echo "requests" >> "$work/requirements.txt"
echo "torch==$TORCH_PIN" > "$work/constraints.txt"

echo "installing into $("$py" -c 'import sys; print(sys.prefix)') (torch held at $TORCH_PIN):"
sed 's/^/  /' "$work/requirements.txt"
"$py" -m pip install -r "$work/requirements.txt" -c "$work/constraints.txt"
