"""Unit tests of the UI -> API converter on hand-written graphs (no ComfyUI needed)."""
import copy
import json
from pathlib import Path

import pytest

try:
    from .convert import ConversionError, ui_to_api, widget_layout
except ImportError:  # collected as a top-level module
    from comfy_harness.convert import ConversionError, ui_to_api, widget_layout

GRAPHS = Path(__file__).with_name("graphs")

# A fake /object_info with the shapes the real server returns (0.3.64).
OI = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["tiny.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL", "CLIP", "VAE"], "display_name": "Load Checkpoint", "output_node": False,
    },
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
        "input_order": {"required": ["text", "clip"]},
        "output": ["CONDITIONING"], "display_name": "CLIP Text Encode (Prompt)", "output_node": False,
    },
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {}],
            "seed": ["INT", {"default": 0, "control_after_generate": True}],
            "steps": ["INT", {"default": 20}],
            "cfg": ["FLOAT", {"default": 8.0}],
            "sampler_name": [["euler", "ddim"], {}],
            "scheduler": [["normal", "karras"], {}],
            "positive": ["CONDITIONING", {}],
            "negative": ["CONDITIONING", {}],
            "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {"default": 1.0}],
        }},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                     "positive", "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "display_name": "KSampler", "output_node": False,
    },
    "EmptyLatentImage": {
        "input": {"required": {"width": ["INT", {}], "height": ["INT", {}], "batch_size": ["INT", {}]}},
        "input_order": {"required": ["width", "height", "batch_size"]},
        "output": ["LATENT"], "display_name": "Empty Latent Image", "output_node": False,
    },
    "LatentUpscaleBy": {
        "input": {"required": {"samples": ["LATENT", {}], "upscale_method": [["nearest-exact", "bilinear"], {}],
                               "scale_by": ["FLOAT", {}]}},
        "input_order": {"required": ["samples", "upscale_method", "scale_by"]},
        "output": ["LATENT"], "display_name": "Upscale Latent By", "output_node": False,
    },
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
        "input_order": {"required": ["samples", "vae"]},
        "output": ["IMAGE"], "display_name": "VAE Decode", "output_node": False,
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                  "hidden": {"prompt": "PROMPT"}},
        "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt"]},
        "output": [], "display_name": "Save Image", "output_node": True,
    },
    "PreviewImage": {
        "input": {"required": {"images": ["IMAGE", {}]}},
        "input_order": {"required": ["images"]},
        "output": [], "display_name": "Preview Image", "output_node": True,
    },
    "LoadImage": {
        "input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
        "input_order": {"required": ["image"]},
        "output": ["IMAGE", "MASK"], "display_name": "Load Image", "output_node": False,
    },
    # V3-style combo and an optional widget after an optional socket.
    "X_V3Node": {
        "input": {"required": {"image": ["IMAGE", {}], "mode": ["COMBO", {"options": ["a", "b"]}],
                               "strength": ["FLOAT", {"default": 1.0}]},
                  "optional": {"mask": ["MASK", {}], "label": ["STRING", {"default": ""}],
                               "count": ["INT", {"forceInput": True}]}},
        "input_order": {"required": ["image", "mode", "strength"], "optional": ["mask", "label", "count"]},
        "output": ["IMAGE"], "display_name": "X V3", "output_node": False,
    },
}


def node(id, type, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    n = {"id": id, "type": type, "pos": [0, 0], "size": [100, 50], "flags": {}, "order": 0, "mode": mode,
         "inputs": [dict(name=i[0], type=i[1], link=None, **({"widget": {"name": i[2]}} if len(i) > 2 else {}))
                    for i in inputs],
         "outputs": [{"name": o, "type": o, "links": []} for o in outputs], "properties": {}}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    return n


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, *a, **k):
        n = node(*a, **k)
        self.nodes.append(n)
        return n

    def link(self, a, aslot, b, bslot, type=None):
        lid = len(self.links) + 1
        na = next(n for n in self.nodes if n["id"] == a)
        nb = next(n for n in self.nodes if n["id"] == b)
        t = type or na["outputs"][aslot]["type"]
        na["outputs"][aslot]["links"].append(lid)
        nb["inputs"][bslot]["link"] = lid
        self.links.append([lid, a, aslot, b, bslot, t])
        return lid

    def wf(self):
        return {"last_node_id": max(n["id"] for n in self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "extra": {}, "version": 0.4}


def txt2img():
    g = Graph()
    g.add(4, "CheckpointLoaderSimple", outputs=["MODEL", "CLIP", "VAE"], widgets=["tiny.safetensors"])
    g.add(6, "CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=["CONDITIONING"], widgets=["a cat"], title="Pos")
    g.add(7, "CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=["CONDITIONING"], widgets=["ugly"])
    g.add(5, "EmptyLatentImage", outputs=["LATENT"], widgets=[64, 48, 1])
    g.add(3, "KSampler", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("latent_image", "LATENT")], outputs=["LATENT"],
          widgets=[42, "randomize", 2, 7.5, "euler", "normal", 1.0])
    g.add(8, "VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=["IMAGE"])
    g.add(9, "SaveImage", inputs=[("images", "IMAGE")], widgets=["out"])
    g.link(4, 0, 3, 0)
    g.link(6, 0, 3, 1)
    g.link(7, 0, 3, 2)
    g.link(5, 0, 3, 3)
    g.link(4, 1, 6, 0)
    g.link(4, 1, 7, 0)
    g.link(3, 0, 8, 0)
    g.link(4, 2, 8, 1)
    g.link(8, 0, 9, 0)
    return g


def test_plain_graph():
    p = ui_to_api(txt2img().wf(), OI)
    assert set(p) == {"3", "4", "5", "6", "7", "8", "9"}
    assert p["3"] == {
        "class_type": "KSampler",
        "inputs": {"seed": 42, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                   "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                   "latent_image": ["5", 0]},
        "_meta": {"title": "KSampler"},
    }
    assert p["6"]["_meta"]["title"] == "Pos"
    assert p["7"]["_meta"]["title"] == "CLIP Text Encode (Prompt)"
    assert p["5"]["inputs"] == {"width": 64, "height": 48, "batch_size": 1}
    assert p["8"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}
    assert p["9"]["inputs"] == {"filename_prefix": "out", "images": ["8", 0]}
    json.dumps(p)  # serialisable


def test_object_form_links_give_the_same_prompt():
    wf = txt2img().wf()
    wf2 = copy.deepcopy(wf)
    wf2["links"] = [{"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3], "target_slot": l[4],
                     "type": l[5]} for l in wf["links"]]
    assert ui_to_api(wf2, OI) == ui_to_api(wf, OI)


def test_control_after_generate_absent_is_tolerated_for_seed():
    g = txt2img()
    ks = next(n for n in g.nodes if n["id"] == 3)
    ks["widgets_values"] = [42, 2, 7.5, "euler", "normal", 1.0]  # an API-ish save without the control value
    p = ui_to_api(g.wf(), OI, strict=False)
    assert p["3"]["inputs"]["steps"] == 2 and p["3"]["inputs"]["denoise"] == 1.0


def test_widgets_values_as_dict():
    g = txt2img()
    next(n for n in g.nodes if n["id"] == 5)["widgets_values"] = {"width": 32, "height": 40, "batch_size": 2,
                                                                  "junk": 1}
    assert ui_to_api(g.wf(), OI)["5"]["inputs"] == {"width": 32, "height": 40, "batch_size": 2}


def test_reroute_chain_is_followed():
    g = txt2img()
    g.links = [l for l in g.links if not (l[1] == 4 and l[3] == 3)]
    g.add(20, "Reroute", inputs=[("", "*")], outputs=["MODEL"])
    g.add(21, "Reroute", inputs=[("", "*")], outputs=["MODEL"])
    g.link(4, 0, 20, 0)
    g.link(20, 0, 21, 0)
    g.link(21, 0, 3, 0)
    p = ui_to_api(g.wf(), OI)
    assert p["3"]["inputs"]["model"] == ["4", 0]
    assert "20" not in p and "21" not in p


def test_primitive_node_value_is_inlined_over_the_widget():
    g = txt2img()
    ks = next(n for n in g.nodes if n["id"] == 3)
    ks["inputs"].append({"name": "steps", "type": "INT", "link": None, "widget": {"name": "steps"}})
    g.add(30, "PrimitiveNode", outputs=["INT"], widgets=[9, "fixed"])
    g.link(30, 0, 3, 4)
    p = ui_to_api(g.wf(), OI)
    assert p["3"]["inputs"]["steps"] == 9
    assert "30" not in p


def test_notes_are_ignored():
    g = txt2img()
    g.add(40, "Note", widgets=["hello"])
    g.add(41, "MarkdownNote", widgets=["# hi"])
    p = ui_to_api(g.wf(), OI)
    assert "40" not in p and "41" not in p


def test_muted_node_is_dropped_and_its_consumer_loses_the_link():
    g = txt2img()
    g.add(50, "PreviewImage", inputs=[("images", "IMAGE")], mode=2)
    g.link(8, 0, 50, 0)
    p = ui_to_api(g.wf(), OI)
    assert "50" not in p
    # A consumer of a muted node gets no link for that input.
    g2 = txt2img()
    next(n for n in g2.nodes if n["id"] == 8)["mode"] = 2
    p2 = ui_to_api(g2.wf(), OI)
    assert "8" not in p2 and "images" not in p2["9"]["inputs"]


def test_bypassed_node_routes_its_same_type_input():
    g = txt2img()
    g.links = [l for l in g.links if not (l[1] == 5 and l[3] == 3)]
    g.add(60, "LatentUpscaleBy", inputs=[("samples", "LATENT")], outputs=["LATENT"], widgets=["bilinear", 1.5],
          mode=4)
    g.add(61, "LatentUpscaleBy", inputs=[("samples", "LATENT")], outputs=["LATENT"], widgets=["bilinear", 2.0],
          mode=4)
    g.link(5, 0, 60, 0)
    g.link(60, 0, 61, 0)
    g.link(61, 0, 3, 3)
    p = ui_to_api(g.wf(), OI)
    assert "60" not in p and "61" not in p
    assert p["3"]["inputs"]["latent_image"] == ["5", 0]


def test_bypass_picks_input_by_type_not_position():
    g = Graph()
    g.add(1, "LoadImage", outputs=["IMAGE", "MASK"], widgets=["a.png", "image"])
    g.add(2, "X_V3Node", inputs=[("mask", "MASK"), ("image", "IMAGE")], outputs=["IMAGE"],
          widgets=["a", 1.0, "x"], mode=4)
    g.add(3, "PreviewImage", inputs=[("images", "IMAGE")])
    g.link(1, 1, 2, 0)
    g.link(1, 0, 2, 1)
    g.link(2, 0, 3, 0)
    p = ui_to_api(g.wf(), OI)
    assert p["3"]["inputs"]["images"] == ["1", 0]


def test_upload_widget_extra_value_skipped_and_optional_widgets():
    g = Graph()
    g.add(1, "LoadImage", outputs=["IMAGE", "MASK"], widgets=["b.png", "image"])
    g.add(2, "X_V3Node", inputs=[("image", "IMAGE"), ("mask", "MASK")], outputs=["IMAGE"],
          widgets=["b", 0.25, "lbl"])
    g.link(1, 0, 2, 0)
    g.link(1, 1, 2, 1)
    p = ui_to_api(g.wf(), OI)
    assert p["1"]["inputs"] == {"image": "b.png"}
    assert p["2"]["inputs"] == {"mode": "b", "strength": 0.25, "label": "lbl", "image": ["1", 0], "mask": ["1", 1]}
    assert [n for n, _ in widget_layout(OI["X_V3Node"])] == ["mode", "strength", "label"]


def test_link_overrides_converted_widget_from_a_real_node():
    g = txt2img()
    g.add(70, "EmptyLatentImage", outputs=["LATENT"], widgets=[8, 8, 1])  # any INT source would do
    ks = next(n for n in g.nodes if n["id"] == 3)
    ks["inputs"].append({"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}})
    lid = len(g.links) + 1
    g.links.append([lid, 70, 0, 3, 4, "INT"])
    ks["inputs"][4]["link"] = lid
    p = ui_to_api(g.wf(), OI)
    assert p["3"]["inputs"]["seed"] == ["70", 0]


def test_unknown_type_fails_loudly_naming_all():
    g = txt2img()
    g.add(80, "SomePack_Missing", inputs=[("image", "IMAGE")])
    g.add(81, "OtherPack_Missing")
    with pytest.raises(ConversionError, match=r"80:SomePack_Missing.*81:OtherPack_Missing"):
        ui_to_api(g.wf(), OI)


def test_widget_count_mismatch_fails_loudly():
    g = txt2img()
    next(n for n in g.nodes if n["id"] == 5)["widgets_values"] = [64, 64, 1, "extra"]
    with pytest.raises(ConversionError, match="left over"):
        ui_to_api(g.wf(), OI)
    next(n for n in g.nodes if n["id"] == 5)["widgets_values"] = [64]
    with pytest.raises(ConversionError, match="ran out"):
        ui_to_api(g.wf(), OI)


def test_dangling_link_and_api_format_input_fail():
    g = txt2img()
    next(n for n in g.nodes if n["id"] == 9)["inputs"][0]["link"] = 999
    with pytest.raises(ConversionError, match="dangling link"):
        ui_to_api(g.wf(), OI)
    with pytest.raises(ConversionError, match="already an API-format prompt"):
        ui_to_api({"1": {"class_type": "X", "inputs": {}}}, OI)


def test_subgraph_instances_are_refused():
    g = txt2img()
    g.add(90, "3f2a0c1e-0000-4000-8000-000000000001")
    wf = g.wf()
    wf["definitions"] = {"subgraphs": [{"id": "3f2a0c1e-0000-4000-8000-000000000001", "nodes": []}]}
    with pytest.raises(ConversionError, match="subgraph"):
        ui_to_api(wf, OI)


def _fake_oi_for(*types):
    return {t: OI[t] for t in types}


def test_shipped_test_graphs_convert_with_the_fake_object_info():
    oi = _fake_oi_for("CheckpointLoaderSimple", "CLIPTextEncode", "KSampler", "EmptyLatentImage",
                      "LatentUpscaleBy", "VAEDecode", "SaveImage", "PreviewImage")
    oi["CheckpointLoaderSimple"] = copy.deepcopy(oi["CheckpointLoaderSimple"])
    plain = ui_to_api(json.loads((GRAPHS / "core_txt2img.json").read_text()), oi)
    feat = ui_to_api(json.loads((GRAPHS / "core_frontend_features.json").read_text()), oi)
    assert set(plain) == set(feat)  # reroute/primitive/notes/bypassed/muted all vanish
    assert feat["3"]["inputs"]["steps"] == 3 and plain["3"]["inputs"]["steps"] == 2
    assert feat["3"]["inputs"]["model"] == ["4", 0] and feat["3"]["inputs"]["latent_image"] == ["5", 0]
    with pytest.raises(ConversionError, match="PhotoOps_DoesNotExist_SelfTest"):
        ui_to_api(json.loads((GRAPHS / "invalid_unknown_node.json").read_text()), oi)
