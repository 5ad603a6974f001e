"""Write the example workflows in ``workflows/`` (ComfyUI UI format, as users share them).

Run ``python tools/make_workflows.py``; the files are deterministic.  Each workflow names
the test checkpoint ``photoops_tiny_sd15.safetensors`` so CI can run it; users pick
their own checkpoint in the loader.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CKPT = "photoops_tiny_sd15.safetensors"


class Graph:
    """Minimal UI-format graph builder: nodes with positional widgets and typed links."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, inputs=(), outputs=(), widgets=None, pos=(0, 0), title=None, size=(320, 120)):
        nid = len(self.nodes) + 1
        n = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1,
             "mode": 0, "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs],
             "outputs": [{"name": name, "type": t, "links": [], "slot_index": i} for i, (name, t) in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}}
        if widgets is not None:
            n["widgets_values"] = list(widgets)
        if title:
            n["title"] = title
        self.nodes.append(n)
        return nid

    def link(self, src, src_slot, dst, dst_input):
        s = self.nodes[src - 1]
        d = self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == dst_input)
        t = s["outputs"][src_slot]["type"]
        lid = len(self.links) + 1
        self.links.append([lid, src, src_slot, dst, slot, t])
        s["outputs"][src_slot]["links"].append(lid)
        d["inputs"][slot]["link"] = lid

    def to_json(self, note=None):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"photoops_note": note} if note else {}, "version": 0.4}


def txt2img_base(g: Graph, prompt: str, negative: str = "blurry", size=(64, 64), batch=1):
    ckpt = g.node("CheckpointLoaderSimple", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                  widgets=[CKPT], pos=(20, 200))
    pos = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                 widgets=[prompt], pos=(380, 40), title="Positive prompt", size=(400, 140))
    neg = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                 widgets=[negative], pos=(380, 230), title="Negative prompt", size=(400, 140))
    lat = g.node("EmptyLatentImage", outputs=[("LATENT", "LATENT")], widgets=[size[0], size[1], batch],
                 pos=(20, 420))
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    return ckpt, pos, neg, lat


def attention_mask() -> dict:
    prompt = "a photo of a red circle on a blue background"
    g = Graph()
    ckpt, pos, neg, lat = txt2img_base(g, prompt)
    cap = g.node("PhotoOps_AttentionCapture", inputs=[("model", "MODEL"), ("clip", "CLIP")],
                 outputs=[("MODEL", "MODEL"), ("capture", "PHOTOOPS_ATTENTION_CAPTURE")],
                 widgets=[prompt, "circle", "all", 0.0, 1.0], pos=(380, 440), size=(400, 220))
    ks = g.node("KSampler", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                    ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")],
                widgets=[42, "fixed", 4, 7.0, "euler", "normal", 1.0], pos=(830, 120), size=(315, 262))
    dec = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 pos=(1180, 40), size=(210, 46))
    save = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=["photoops_attention_image"],
                  pos=(1420, 20), size=(260, 270))
    am = g.node("PhotoOps_AttentionMask", inputs=[("capture", "PHOTOOPS_ATTENTION_CAPTURE"), ("samples", "LATENT"),
                                                  ("image", "IMAGE")],
                outputs=[("mask", "MASK"), ("heatmap", "IMAGE")], widgets=["quantile", 0.8, 0.5, "image"],
                pos=(1180, 330), size=(300, 180))
    heat = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=["photoops_attention_heatmap"],
                  pos=(1520, 330), size=(260, 270), title="Heat map")
    m2i = g.node("MaskToImage", inputs=[("mask", "MASK")], outputs=[("IMAGE", "IMAGE")], pos=(1520, 640),
                 size=(210, 30))
    msave = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=["photoops_attention_mask"],
                   pos=(1760, 640), size=(260, 270), title="Mask")
    g.link(ckpt, 0, cap, "model")
    g.link(ckpt, 1, cap, "clip")
    g.link(cap, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(ckpt, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    g.link(cap, 1, am, "capture")
    g.link(ks, 0, am, "samples")
    g.link(dec, 0, am, "image")
    g.link(am, 1, heat, "images")
    g.link(am, 0, m2i, "mask")
    g.link(m2i, 0, msave, "images")
    return g.to_json("Attention Capture watches the word 'circle' while KSampler runs with the returned MODEL; "
                     "Attention Mask turns the recording into a mask and a heat map.")


WORKFLOWS = {"attention_mask.json": attention_mask}


def main():
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        (out / name).write_text(json.dumps(build(), indent=1) + "\n")
        print("wrote", out / name)


if __name__ == "__main__":
    main()
