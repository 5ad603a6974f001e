"""Convert a ComfyUI workflow from UI format (what users save) to API format (what POST /prompt takes).

ComfyUI has no server-side converter; only the frontend's ``app.graphToPrompt()``
converts.  This is our own, for CI (docs/comfyui-integration.md §9):

* widget order comes from ``/object_info`` (``input_order``: required, then
  optional); socket-only inputs are skipped; INT/FLOAT/STRING/BOOLEAN/COMBO and
  list (combo) types are widgets unless ``forceInput``;
* front-end-only positional extras are skipped: the ``control_after_generate``
  value after seed-like widgets, and one value after upload widgets;
* a link overrides a widget that was converted to an input;
  ``widgets_values`` may be a list or a dict;
* front-end-only nodes: ``Reroute`` is followed through, a ``PrimitiveNode``'s
  value is inlined, ``Note``/``MarkdownNote`` are ignored;
* muted nodes (mode 2) are dropped; a bypassed node (mode 4) is routed
  around: each consumer gets the bypassed node's input of the same type;
* unknown node types, subgraphs, dangling links and widget-count mismatches
  raise :class:`ConversionError`.

    api_prompt = ui_to_api(workflow_dict, object_info)
"""
from __future__ import annotations

from dataclasses import dataclass

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "upload")
SEED_NAMES = {"seed", "noise_seed"}

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4

#: Node types that exist only in the frontend.
REROUTE_TYPES = {"Reroute"}
PRIMITIVE_TYPES = {"PrimitiveNode"}
NOTE_TYPES = {"Note", "MarkdownNote"}
FRONTEND_ONLY = REROUTE_TYPES | PRIMITIVE_TYPES | NOTE_TYPES


class ConversionError(ValueError):
    """The workflow cannot be converted faithfully (message says why, naming nodes)."""


@dataclass(frozen=True)
class Link:
    id: int
    from_node: int
    from_slot: int
    to_node: int
    to_slot: int
    type: str


def _parse_links(raw_links) -> dict[int, Link]:
    links: dict[int, Link] = {}
    for raw in raw_links or []:
        if raw is None:
            continue
        if isinstance(raw, dict):  # newer files: object-form links
            lk = Link(
                int(raw["id"]), int(raw["origin_id"]), int(raw["origin_slot"]),
                int(raw["target_id"]), int(raw["target_slot"]), str(raw.get("type", "*")),
            )
        else:
            if len(raw) < 5:
                raise ConversionError(f"malformed link {raw!r}")
            lk = Link(int(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]),
                      str(raw[5]) if len(raw) > 5 else "*")
        links[lk.id] = lk
    return links


def _types_match(a, b) -> bool:
    if a in (None, "*", "") or b in (None, "*", ""):
        return True
    sa = set(str(a).split(","))
    sb = set(str(b).split(","))
    return bool(sa & sb)


def _is_widget_spec(spec) -> tuple[bool, dict]:
    """(is a widget, options) for an object_info input spec like ["INT", {...}]."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return False, {}
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False, opts
    if isinstance(typ, (list, tuple)):
        return True, opts
    return (isinstance(typ, str) and typ in WIDGET_TYPES), opts


def widget_layout(node_info: dict) -> list[tuple[str, dict]]:
    """[(input name, options), ...] of a node type's widgets, in frontend order."""
    inputs = node_info.get("input") or {}
    order = node_info.get("input_order") or {
        sect: list((inputs.get(sect) or {}).keys()) for sect in ("required", "optional")
    }
    out = []
    for sect in ("required", "optional"):
        specs = inputs.get(sect) or {}
        for name in order.get(sect) or []:
            if name not in specs:
                continue
            is_widget, opts = _is_widget_spec(specs[name])
            if is_widget:
                out.append((name, opts))
    return out


def _assign_widgets(node: dict, node_info: dict, strict: bool) -> dict:
    """Map a node's widgets_values to {input name: value}."""
    values = node.get("widgets_values")
    layout = widget_layout(node_info)
    if values is None:
        return {}
    if isinstance(values, dict):
        names = {n for n, _ in layout}
        return {k: v for k, v in values.items() if k in names}
    if not isinstance(values, list):
        raise ConversionError(f"node {node.get('id')} ({node.get('type')}): widgets_values is {type(values).__name__}")
    out = {}
    i = 0
    for name, opts in layout:
        if i >= len(values):
            if strict:
                raise ConversionError(
                    f"node {node.get('id')} ({node.get('type')}): widgets_values has {len(values)} entries, "
                    f"ran out at widget {name!r} (widgets: {[n for n, _ in layout]})"
                )
            break
        out[name] = values[i]
        i += 1
        # Front-end-only values stored right after some widgets.
        if i < len(values):
            nxt = values[i]
            if opts.get("control_after_generate") or (
                name in SEED_NAMES and isinstance(nxt, str) and nxt in CONTROL_VALUES
            ):
                if isinstance(nxt, str) and nxt in CONTROL_VALUES:
                    i += 1
                elif opts.get("control_after_generate") and strict:
                    raise ConversionError(
                        f"node {node.get('id')} ({node.get('type')}): expected a control_after_generate value "
                        f"after {name!r}, found {nxt!r}"
                    )
            elif any(opts.get(f) for f in UPLOAD_FLAGS):
                i += 1
    if strict and i < len(values):
        raise ConversionError(
            f"node {node.get('id')} ({node.get('type')}): {len(values) - i} widget value(s) left over "
            f"({values[i:]!r}); widgets: {[n for n, _ in layout]} — stale workflow or a JS-added widget?"
        )
    return out


def ui_to_api(workflow: dict, object_info: dict, *, strict: bool = True) -> dict:
    """Convert a UI-format workflow to an API-format prompt.

    ``object_info``: the server's ``GET /object_info`` (or a fake with the same
    shape: ``{type: {"input": {"required": {...}, "optional": {...}},
    "input_order": {...}, "display_name": ...}}``).
    ``strict``: raise on widget-count mismatches (default) instead of guessing.
    """
    if not isinstance(workflow, dict) or "nodes" not in workflow:
        if isinstance(workflow, dict) and workflow and all(
            isinstance(v, dict) and "class_type" in v for v in workflow.values()
        ):
            raise ConversionError("this is already an API-format prompt, not a UI workflow")
        raise ConversionError("not a UI-format workflow (no 'nodes')")

    subgraphs = ((workflow.get("definitions") or {}).get("subgraphs")) or []
    subgraph_ids = {sg.get("id") for sg in subgraphs if isinstance(sg, dict)}

    nodes: dict[int, dict] = {}
    for n in workflow["nodes"]:
        nid = int(n["id"])
        if nid in nodes:
            raise ConversionError(f"duplicate node id {nid}")
        nodes[nid] = n
    links = _parse_links(workflow.get("links"))

    # Loud failure on anything we cannot run.
    unknown = []
    for nid, n in sorted(nodes.items()):
        t = n.get("type")
        if t in subgraph_ids:
            raise ConversionError(f"node {nid} is a subgraph instance ({t}); subgraphs are not supported")
        if t in FRONTEND_ONLY:
            continue
        if t not in object_info:
            unknown.append(f"{nid}:{t}")
    if unknown:
        raise ConversionError(
            "unknown node type(s) (missing custom node pack?): " + ", ".join(unknown)
        )

    def input_link_of(node: dict, slot: int):
        ins = node.get("inputs") or []
        if slot >= len(ins):
            return None
        return ins[slot].get("link")

    def resolve(link_id, want_type, seen=()):
        """Follow a link to its real source: ('node', id, slot), ('value', v) or None."""
        if link_id is None:
            return None
        if link_id in seen:
            raise ConversionError(f"link cycle through link {link_id}")
        seen = seen + (link_id,)
        lk = links.get(int(link_id))
        if lk is None:
            raise ConversionError(f"dangling link id {link_id}")
        src = nodes.get(lk.from_node)
        if src is None:
            raise ConversionError(f"link {lk.id} comes from missing node {lk.from_node}")
        st = src.get("type")
        mode = src.get("mode", MODE_ALWAYS)
        if st in REROUTE_TYPES:
            return resolve(input_link_of(src, 0), want_type, seen)
        if st in PRIMITIVE_TYPES:
            vals = src.get("widgets_values")
            if isinstance(vals, dict):
                vals = list(vals.values())
            if not vals:
                raise ConversionError(f"PrimitiveNode {lk.from_node} has no value")
            return ("value", vals[0])
        if st in NOTE_TYPES:
            raise ConversionError(f"link {lk.id} comes from a note node {lk.from_node}")
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            out_type = lk.type
            outs = src.get("outputs") or []
            if lk.from_slot < len(outs):
                out_type = outs[lk.from_slot].get("type", out_type)
            ins = src.get("inputs") or []
            order = []
            if lk.from_slot < len(ins):
                order.append(lk.from_slot)
            order += [i for i in range(len(ins)) if i != lk.from_slot]
            for i in order:
                inp = ins[i]
                if inp.get("link") is not None and _types_match(inp.get("type"), out_type):
                    return resolve(inp["link"], out_type, seen)
            return None
        return ("node", str(lk.from_node), lk.from_slot)

    prompt: dict = {}
    for nid, n in sorted(nodes.items()):
        t = n.get("type")
        mode = n.get("mode", MODE_ALWAYS)
        if t in FRONTEND_ONLY or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[t]
        inputs = _assign_widgets(n, info, strict)
        declared = set((info.get("input") or {}).get("required", {})) | set(
            (info.get("input") or {}).get("optional", {}) or {}
        )
        for inp in n.get("inputs") or []:
            name = inp.get("name")
            if inp.get("widget") and isinstance(inp["widget"], dict):
                name = inp["widget"].get("name", name)
            link_id = inp.get("link")
            if link_id is None:
                continue
            if declared and name not in declared:
                raise ConversionError(f"node {nid} ({t}): input {name!r} is not an input of {t}")
            src = resolve(link_id, inp.get("type"))
            if src is None:
                # Source muted/bypassed with nothing to route: input stays unset
                # (or keeps its widget value), as in the frontend.
                continue
            if src[0] == "value":
                inputs[name] = src[1]
            else:
                inputs[name] = [src[1], src[2]]
        title = n.get("title") or info.get("display_name") or t
        prompt[str(nid)] = {"class_type": t, "inputs": inputs, "_meta": {"title": title}}
    return prompt


def output_nodes(workflow_or_prompt: dict, object_info: dict) -> list[str]:
    """Ids of output nodes (``output_node`` in object_info) of an API prompt."""
    return [
        nid for nid, node in workflow_or_prompt.items()
        if (object_info.get(node["class_type"]) or {}).get("output_node")
    ]
