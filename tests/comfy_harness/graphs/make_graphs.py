"""Write the harness's core-only test graphs (UI format, as the frontend saves them).

    python tests/comfy_harness/graphs/make_graphs.py

* core_txt2img.json: CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage 64x64
  -> KSampler 2 steps -> VAEDecode -> SaveImage, naming the fixture checkpoint.
* core_frontend_features.json: the same, plus every frontend-only construct the converter
  handles: a Reroute, a PrimitiveNode driving the converted ``steps`` widget (3, while the
  KSampler's own widget says 2), Note, MarkdownNote, a bypassed LatentUpscaleBy x1.5 (the
  output must stay 64x64) and a muted PreviewImage; written in the schema-version-1 layout
  with object-form links.
* invalid_unknown_node.json: a node type nobody defines (converter and browser self-tests).

These graphs are test-only; the pack's user-facing workflows live in ``workflows/``.
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CKPT = "photoops_tiny_sd15.safetensors"  # = fixtures.FIXTURE_CHECKPOINT_NAME


def inp(name, type_, widget=None):
    d = {"name": name, "type": type_, "link": None}
    if widget:
        d["widget"] = {"name": widget}
    return d


def out(name, type_, widget=None):
    d = {"name": name, "type": type_}
    if widget:
        d["widget"] = {"name": widget}
    return d


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, id_, type_, pos, size=(315, 100), inputs=(), outputs=(), widgets=None, mode=0, title=None,
             props=None):
        n = {"id": id_, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": len(self.nodes),
             "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": [dict(o, links=[]) for o in outputs],
             "properties": props if props is not None else {"Node name for S&R": type_}}
        if widgets is not None:
            n["widgets_values"] = widgets
        if title:
            n["title"] = title
        for i, o in enumerate(n["outputs"]):
            o["slot_index"] = i
        self.nodes.append(n)
        return n

    def get(self, id_):
        return next(n for n in self.nodes if n["id"] == id_)

    def link(self, a, a_slot, b, b_slot):
        lid = len(self.links) + 1
        src, dst = self.get(a), self.get(b)
        src["outputs"][a_slot]["links"].append(lid)
        dst["inputs"][b_slot]["link"] = lid
        self.links.append([lid, a, a_slot, b, b_slot, src["outputs"][a_slot]["type"]])

    def dump(self, name, schema_v1=False):
        wf = {"id": "00000000-0000-4000-8000-0000000000%02d" % len(self.nodes), "revision": 0,
              "last_node_id": max(n["id"] for n in self.nodes), "last_link_id": len(self.links),
              "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
              "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}
        if schema_v1:
            # Object-form links belong to the version-1 layout; frontend 1.27 mis-reads
            # them in a 0.4 file (PrimitiveNode.applyToGraph then throws).
            wf["links"] = [{"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3],
                            "target_slot": l[4], "type": l[5]} for l in self.links]
            wf["version"] = 1
            wf["state"] = {"lastGroupId": 0, "lastNodeId": wf.pop("last_node_id"),
                           "lastLinkId": wf.pop("last_link_id"), "lastRerouteId": 0}
        with open(HERE / name, "w") as f:
            json.dump(wf, f, indent=1)
            f.write("\n")


def txt2img(g, ksampler_extra_inputs=()):
    g.node(4, "CheckpointLoaderSimple", (20, 200), (315, 98),
           outputs=[out("MODEL", "MODEL"), out("CLIP", "CLIP"), out("VAE", "VAE")], widgets=[CKPT])
    g.node(6, "CLIPTextEncode", (380, 60), (400, 160), inputs=[inp("clip", "CLIP")],
           outputs=[out("CONDITIONING", "CONDITIONING")], widgets=["a photo of a red circle"], title="Positive prompt")
    g.node(7, "CLIPTextEncode", (380, 280), (400, 160), inputs=[inp("clip", "CLIP")],
           outputs=[out("CONDITIONING", "CONDITIONING")], widgets=["blurry"], title="Negative prompt")
    g.node(5, "EmptyLatentImage", (20, 420), (315, 106), outputs=[out("LATENT", "LATENT")], widgets=[64, 64, 1])
    g.node(3, "KSampler", (830, 120), (315, 262),
           inputs=[inp("model", "MODEL"), inp("positive", "CONDITIONING"), inp("negative", "CONDITIONING"),
                   inp("latent_image", "LATENT"), *ksampler_extra_inputs],
           outputs=[out("LATENT", "LATENT")], widgets=[42, "fixed", 2, 7.0, "euler", "normal", 1.0])
    g.node(8, "VAEDecode", (1180, 120), (210, 46), inputs=[inp("samples", "LATENT"), inp("vae", "VAE")],
           outputs=[out("IMAGE", "IMAGE")])
    g.node(9, "SaveImage", (1420, 120), (300, 300), inputs=[inp("images", "IMAGE")], widgets=["photoops_test"])


def main():
    g = Graph()
    txt2img(g)
    for a, a_slot, b, b_slot in [(4, 0, 3, 0), (6, 0, 3, 1), (7, 0, 3, 2), (5, 0, 3, 3), (4, 1, 6, 0),
                                 (4, 1, 7, 0), (3, 0, 8, 0), (4, 2, 8, 1), (8, 0, 9, 0)]:
        g.link(a, a_slot, b, b_slot)
    g.dump("core_txt2img.json")

    g = Graph()
    txt2img(g, ksampler_extra_inputs=[inp("steps", "INT", widget="steps")])
    g.node(10, "Reroute", (600, 480), (75, 26), inputs=[{"name": "", "type": "*", "link": None}],
           outputs=[out("", "MODEL")], props={"showOutputText": False, "horizontal": False})
    g.node(11, "PrimitiveNode", (560, 560), (210, 82), outputs=[out("INT", "INT", widget="steps")],
           widgets=[3, "fixed"], title="steps", props={"Run widget replace on values": False})
    g.node(12, "Note", (20, 600), (300, 90),
           widgets=["Test graph: every frontend-only construct the converter handles."], props={})
    g.node(13, "MarkdownNote", (20, 720), (300, 90),
           widgets=["**Bypassed** upscale: the output must stay 64x64."], props={})
    g.node(14, "LatentUpscaleBy", (380, 480), (315, 82), inputs=[inp("samples", "LATENT")],
           outputs=[out("LATENT", "LATENT")], widgets=["nearest-exact", 1.5], mode=4)
    g.node(15, "PreviewImage", (1420, 460), (300, 250), inputs=[inp("images", "IMAGE")], mode=2)
    for a, a_slot, b, b_slot in [(4, 0, 10, 0), (10, 0, 3, 0), (6, 0, 3, 1), (7, 0, 3, 2), (5, 0, 14, 0),
                                 (14, 0, 3, 3), (11, 0, 3, 4), (4, 1, 6, 0), (4, 1, 7, 0), (3, 0, 8, 0),
                                 (4, 2, 8, 1), (8, 0, 9, 0), (8, 0, 15, 0)]:
        g.link(a, a_slot, b, b_slot)
    g.get(9)["widgets_values"] = ["photoops_frontend_features"]
    g.dump("core_frontend_features.json", schema_v1=True)

    g = Graph()
    g.node(4, "CheckpointLoaderSimple", (20, 200), (315, 98),
           outputs=[out("MODEL", "MODEL"), out("CLIP", "CLIP"), out("VAE", "VAE")], widgets=[CKPT])
    g.node(20, "PhotoOps_DoesNotExist_SelfTest", (420, 200), (315, 80), inputs=[inp("model", "MODEL")],
           outputs=[out("MODEL", "MODEL")], widgets=[0.5])
    g.link(4, 0, 20, 0)
    g.dump("invalid_unknown_node.json")


if __name__ == "__main__":
    main()
