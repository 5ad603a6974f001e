"""The override table: what the harness changes in a converted workflow before CI runs it.

A file in ``workflows/`` is what a user opens; CI runs the same file with tiny fixtures.
Whatever must differ is listed here, applied to the API-format prompt after conversion (the
JSON on disk is never changed):

| node | when | override | why |
|---|---|---|---|
| ``CLIPVisionLoader`` | ``clip_name`` is a tiny fixture (``photoops_tiny_*``) | class -> ``PhotoOpsTest_CLIPVisionLoaderAny`` (``stub_nodes/``) | core's loader reads only full-size towers; the test loader builds the tiny one from its shapes |
"""
from __future__ import annotations

import copy

FIXTURE_PREFIX = "photoops_tiny_"

#: (class_type, input name) -> replacement class_type, applied when that input names a fixture file.
CLASS_OVERRIDES = {("CLIPVisionLoader", "clip_name"): "PhotoOpsTest_CLIPVisionLoaderAny"}


def apply_overrides(prompt: dict) -> dict:
    """A copy of the API-format ``prompt`` with the table above applied."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        for (cls, name), new in CLASS_OVERRIDES.items():
            value = node.get("inputs", {}).get(name)
            if node.get("class_type") == cls and isinstance(value, str) and value.startswith(FIXTURE_PREFIX):
                node["class_type"] = new
    return out
