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
SEMANTIC_MASK_RULE = "otsu"   # the Semantic Guide default (nodes/semantic_guide.py DEFAULT_MASK_RULE)


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

    def note(self, text: str, width: int = 520, height: int = 110, gap: int = 60):
        """A frontend-only Note node below every other node (LiteGraph draws a ~30 px title bar
        above ``pos``, hence the gap), so it never overlaps one."""
        bottom = max(n["pos"][1] + n["size"][1] for n in self.nodes)
        nid = len(self.nodes) + 1
        self.nodes.append({"id": nid, "type": "Note", "pos": [20, bottom + gap], "size": [width, height],
                           "flags": {}, "order": nid - 1, "mode": 0, "inputs": [], "outputs": [],
                           "properties": {}, "widgets_values": [text]})
        return nid

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


PHOTO = "photoops_example.png"
SOURCE = "a red circle on a blue background"
TARGET = "a green circle on a blue background"


def _photo_and_prompts(g: Graph, source: str, target: str | None):
    """Checkpoint, Load Image -> VAE Encode, source / target / empty prompts."""
    ckpt = g.node("CheckpointLoaderSimple", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                  widgets=[CKPT], pos=(20, 40))
    img = g.node("LoadImage", outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], widgets=[PHOTO, "image"],
                 pos=(20, 220), size=(300, 320), title="Your photo")
    enc = g.node("VAEEncode", inputs=[("pixels", "IMAGE"), ("vae", "VAE")], outputs=[("LATENT", "LATENT")],
                 pos=(360, 420), size=(210, 46))
    src = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                 widgets=[source], pos=(360, 40), title="Source prompt (describes the photo)", size=(380, 120))
    neg = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                 widgets=[""], pos=(360, 200), title="Negative prompt", size=(380, 100))
    g.link(ckpt, 1, src, "clip")
    g.link(ckpt, 1, neg, "clip")
    g.link(img, 0, enc, "pixels")
    g.link(ckpt, 2, enc, "vae")
    tgt = None
    if target is not None:
        tgt = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                     widgets=[target], pos=(360, 320), title="Target prompt (the edit)", size=(380, 90))
        g.link(ckpt, 1, tgt, "clip")
    return ckpt, img, enc, src, neg, tgt


def _invert_and_replay(g: Graph, ckpt, enc, src, neg, guide_pos, model_for_invert, method, skip, replay_cfg,
                       steps=12, eta_schedule=None, region=None, prefix="photoops_inversion", guider=None):
    sched = g.node("BasicScheduler", inputs=[("model", "MODEL")], outputs=[("SIGMAS", "SIGMAS")],
                   widgets=["normal", steps, 1.0], pos=(800, 620), size=(300, 110))
    inv = g.node("PhotoOps_Invert",
                 inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                         ("latent", "LATENT"), ("sigmas", "SIGMAS"), ("eta_schedule", "PHOTOOPS_ETA_SCHEDULE"),
                         ("region", "PHOTOOPS_ATTENTION_CAPTURE")],
                 outputs=[("inversion", "PHOTOOPS_INVERSION"), ("start_latent", "LATENT")],
                 widgets=[method, skip, 1.0, 0, "fixed", "threshold", 0.2, 10, False, 1], pos=(1140, 300), size=(320, 330))
    smp = g.node("PhotoOps_InversionSampler", inputs=[("inversion", "PHOTOOPS_INVERSION")],
                 outputs=[("SAMPLER", "SAMPLER")], widgets=[8.0, 0.25], pos=(1500, 300), size=(260, 100))
    own_guider = guider is None
    if own_guider:
        guider = g.node("CFGGuider", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"),
                                             ("negative", "CONDITIONING")], outputs=[("GUIDER", "GUIDER")],
                        widgets=[replay_cfg], pos=(1500, 100), size=(260, 100))
    noise = g.node("DisableNoise", outputs=[("NOISE", "NOISE")], pos=(1500, 20), size=(210, 30))
    sca = g.node("SamplerCustomAdvanced", inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                                                  ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                 outputs=[("output", "LATENT"), ("denoised_output", "LATENT")], pos=(1800, 100), size=(270, 120))
    dec = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 pos=(2100, 100), size=(210, 46))
    save = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=[prefix], pos=(2340, 100), size=(260, 280))
    g.link(ckpt, 0, sched, "model")
    g.link(model_for_invert[0], model_for_invert[1], inv, "model")
    g.link(src, 0, inv, "positive")
    g.link(neg, 0, inv, "negative")
    g.link(enc, 0, inv, "latent")
    g.link(sched, 0, inv, "sigmas")
    if eta_schedule is not None:
        g.link(eta_schedule, 0, inv, "eta_schedule")
    if region is not None:
        g.link(region[0], region[1], inv, "region")
    g.link(inv, 0, smp, "inversion")
    if own_guider:
        g.link(ckpt, 0, guider, "model")
        g.link(guide_pos, 0, guider, "positive")
        g.link(neg, 0, guider, "negative")
    g.link(noise, 0, sca, "noise")
    g.link(guider, 0, sca, "guider")
    g.link(smp, 0, sca, "sampler")
    g.link(sched, 0, sca, "sigmas")
    g.link(inv, 1, sca, "latent_image")
    g.link(sca, 0, dec, "samples")
    g.link(ckpt, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    return inv, sca


def inversion_reconstruct() -> dict:
    g = Graph()
    ckpt, img, enc, src, neg, _ = _photo_and_prompts(g, SOURCE, None)
    _invert_and_replay(g, ckpt, enc, src, neg, src, (ckpt, 0), "ddpm", 0, 1.0, prefix="photoops_reconstruction")
    return g.to_json("Edit-friendly DDPM inversion replayed with the source prompt and CFG 1: the output equals the "
                     "photo (up to VAE encode/decode). Use the same SIGMAS for Invert and SamplerCustomAdvanced.")


def inversion_ddpm_edit() -> dict:
    g = Graph()
    ckpt, img, enc, src, neg, tgt = _photo_and_prompts(g, SOURCE, TARGET)
    _invert_and_replay(g, ckpt, enc, src, neg, tgt, (ckpt, 0), "ddpm", 3, 5.0, prefix="photoops_ddpm_edit")
    return g.to_json("DDPM-inversion editing (Huberman-Spiegelglas et al.): invert with the source prompt, replay the "
                     "noise maps with the target prompt. skip keeps structure; the target CFG sets the strength.")


def inversion_eta_edit() -> dict:
    g = Graph()
    ckpt, img, enc, src, neg, tgt = _photo_and_prompts(g, SOURCE, TARGET)
    cap = g.node("PhotoOps_AttentionCapture", inputs=[("model", "MODEL"), ("clip", "CLIP")],
                 outputs=[("MODEL", "MODEL"), ("capture", "PHOTOOPS_ATTENTION_CAPTURE")],
                 widgets=[SOURCE, "red circle", "lowres", 0.0, 1.0], pos=(800, 40), size=(300, 220),
                 title="Edit region: the source word")
    eta = g.node("PhotoOps_EtaSchedule", inputs=[("mask", "MASK")], outputs=[("eta_schedule", "PHOTOOPS_ETA_SCHEDULE")],
                 widgets=["paper_A", 0.4, "0:0, 0.6:0, 1:0.7", 1.0], pos=(800, 300), size=(300, 260))
    g.link(ckpt, 0, cap, "model")
    g.link(ckpt, 1, cap, "clip")
    inv, _ = _invert_and_replay(g, ckpt, enc, src, neg, tgt, (cap, 0), "eta", 0, 5.0, eta_schedule=eta,
                             region=(cap, 1), prefix="photoops_eta_edit")
    save = g.node("PhotoOps_SaveInversion", inputs=[("inversion", "PHOTOOPS_INVERSION")], widgets=["photoops_eta"],
                  pos=(1500, 420), size=(260, 60))
    g.link(inv, 0, save, "inversion")
    return g.to_json("Eta Inversion (Kang et al.): DDIM inversion, then noise with a time-dependent eta (paper "
                     "config A) limited to where the source word attends; eta is 0 (DDIM) elsewhere, keeping the "
                     "background. The inversion is also saved for later edits.")


def _concept(g: Graph, ckpt, text, direction, scale, threshold, warmup, pos, previous=None):
    c = g.node("PhotoOps_EditConcept", inputs=[("clip", "CLIP"), ("previous", "PHOTOOPS_EDIT_CONCEPTS")],
               outputs=[("concepts", "PHOTOOPS_EDIT_CONCEPTS")],
               widgets=[text, direction, scale, threshold, warmup, -1, 1.0], pos=pos, size=(300, 230))
    g.link(ckpt, 1, c, "clip")
    if previous is not None:
        g.link(previous, 0, c, "previous")
    return c


def _semantic_edit(mode: str, title: str, note: str, prefix: str, method: str = "ddpm") -> dict:
    g = Graph()
    ckpt, img, enc, src, neg, _ = _photo_and_prompts(g, SOURCE, None)
    remove = _concept(g, ckpt, "red", "remove", 5.0, 0.9, 1, (800, 20))
    add = _concept(g, ckpt, "green", "add", 7.0, 0.9, 1, (800, 270), previous=remove)
    sg = g.node("PhotoOps_SemanticGuide", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"),
                                                  ("negative", "CONDITIONING"),
                                                  ("concepts", "PHOTOOPS_EDIT_CONCEPTS")],
                outputs=[("GUIDER", "GUIDER"), ("masks", "PHOTOOPS_CONCEPT_MASKS")],
                widgets=[mode, 7.5, False, 0.3, 0.6, "intersect", SEMANTIC_MASK_RULE, 0.5],
                pos=(1140, 20), size=(300, 240), title=title)
    g.link(ckpt, 0, sg, "model")
    g.link(src, 0, sg, "positive")
    g.link(neg, 0, sg, "negative")
    g.link(add, 0, sg, "concepts")
    _, sca = _invert_and_replay(g, ckpt, enc, neg, neg, None, (ckpt, 0), method, 3, 1.0, prefix=prefix, guider=sg)
    cm = g.node("PhotoOps_ConceptMasks", inputs=[("masks", "PHOTOOPS_CONCEPT_MASKS"), ("samples", "LATENT")],
                outputs=[("mask", "MASK"), ("heatmap", "IMAGE")], widgets=[1], pos=(2100, 420), size=(260, 100),
                title="Where 'green' acted")
    save = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=[prefix + "_concept_mask"], pos=(2340, 420),
                  size=(260, 280))
    g.link(sg, 1, cm, "masks")
    g.link(sca, 0, cm, "samples")
    g.link(cm, 1, save, "images")
    return g.to_json(note)


def ledits_edit() -> dict:
    return _semantic_edit("sega", "Semantic Guide (LEDITS)", "LEDITS (Tsaban & Passos): edit-friendly DDPM inversion "
                          "with an empty source prompt, replayed with SEGA concepts: remove 'red', add 'green'. "
                          "Target CFG is off (pure concept editing, the paper's workflow a).", "photoops_ledits")


def ledits_pp_edit() -> dict:
    return _semantic_edit("ledits++", "Semantic Guide (LEDITS++)", "LEDITS++ (Brack et al.): its own inversion "
                          "(Invert method dpmpp_2m_sde: SDE DPM-Solver++ 2M, exact, only the steps after skip are "
                          "inverted), concepts applied only inside implicit masks (cross-attention AND "
                          "noise-estimate masks); no momentum, no target CFG.", "photoops_ledits_pp",
                          method="dpmpp_2m_sde")


def concept_learn() -> dict:
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                  widgets=[CKPT], pos=(20, 40))
    img = g.node("LoadImage", outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], widgets=[PHOTO, "image"],
                 pos=(20, 220), size=(300, 320), title="Your photos (1-N)")
    cl = g.node("PhotoOps_ConceptLearn",
                inputs=[("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("images", "IMAGE"),
                        ("init_masks", "MASK")],
                outputs=[("clip", "CLIP"), ("masks", "MASK"), ("mask_preview", "IMAGE"), ("prompt_hint", "STRING"),
                         ("loss", "LOSS_MAP")],
                widgets=["cl_disc, cl_backdrop", "circle, background", 2, 0.01, 1, 0, "fixed", 64, 0.01, 1, True,
                         False, 0, False, "", "none", "union"],
                pos=(360, 40), size=(340, 520), title="Concept Learn (tiny steps for the demo; use 400 at 512 px)")
    msave = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=["photoops_concept_masks"], pos=(740, 420),
                   size=(260, 280), title="Learned masks")
    pos = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                 widgets=["a photo of two embedding:cl_disc on embedding:cl_backdrop, small"], pos=(740, 40),
                 title="New prompt composing both concepts", size=(400, 140))
    neg = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                 widgets=["blurry"], pos=(740, 230), title="Negative prompt", size=(400, 120))
    lat = g.node("EmptyLatentImage", outputs=[("LATENT", "LATENT")], widgets=[64, 64, 1], pos=(1180, 400))
    ks = g.node("KSampler", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                    ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")],
                widgets=[42, "fixed", 4, 7.0, "euler", "normal", 1.0], pos=(1180, 40), size=(315, 262))
    dec = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 pos=(1530, 40), size=(210, 46))
    save = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=["photoops_concept_compose"], pos=(1770, 40),
                  size=(260, 280))
    g.link(ckpt, 0, cl, "model")
    g.link(ckpt, 1, cl, "clip")
    g.link(ckpt, 2, cl, "vae")
    g.link(img, 0, cl, "images")
    g.link(cl, 2, msave, "images")
    g.link(cl, 0, pos, "clip")
    g.link(cl, 0, neg, "clip")
    g.link(ckpt, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(ckpt, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    return g.to_json("Concept Learn (Rahman et al.): one new token per concept plus its mask, learned by EM from the "
                     "photo(s) without user masks, saved as embeddings/cl_disc.safetensors and "
                     "cl_backdrop.safetensors. The new prompt composes them as embedding:cl_disc and "
                     "embedding:cl_backdrop; the files also work in any later workflow and in other UIs. Route the "
                     "prompts' CLIP through Concept Learn so they are encoded after training. Real use: 400 steps at "
                     "512 px on a GPU.")



# ---- pOps (issue 6) ----------------------------------------------------------------------
POPS_CLIP_VISION = "photoops_tiny_clip_vision_g.safetensors"   # users: clip_vision_g.safetensors (ViT-bigG/14)
POPS_OPERATOR = "photoops_tiny_texturing.safetensors"          # users: texturing/learned_prior.pth or converted
POPS_OPERATOR2 = "photoops_tiny_scene.safetensors"             # users: scene/learned_prior.pth or converted
POPS_UNET = "photoops_tiny_sdxl_unet.safetensors"              # users: the SDXL base UNet (or use a checkpoint)
POPS_VAE = "photoops_tiny_vae.safetensors"                     # users: sdxl_vae.safetensors


def _pops_encode(g: Graph, cvl, title: str, pos):
    img = g.node("LoadImage", outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], widgets=[PHOTO, "image"],
                 pos=pos, size=(300, 320), title=title)
    enc = g.node("CLIPVisionEncode", inputs=[("clip_vision", "CLIP_VISION"), ("image", "IMAGE")],
                 outputs=[("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")], widgets=["center"],
                 pos=(pos[0] + 340, pos[1]), size=(250, 80))
    g.link(cvl, 0, enc, "clip_vision")
    g.link(img, 0, enc, "image")
    return enc


def _pops_apply(g: Graph, operator_widgets, a, b, seed, pos, title):
    opl = g.node("PhotoOps_PopsOperatorLoader", outputs=[("operator", "PHOTOOPS_POPS_OPERATOR")],
                 widgets=list(operator_widgets), pos=(pos[0], pos[1] - 150), size=(330, 110), title=title[0])
    app = g.node("PhotoOps_OperatorApply",
                 inputs=[("operator", "PHOTOOPS_POPS_OPERATOR"), ("input_a", "CLIP_VISION_OUTPUT"),
                         ("input_b", "CLIP_VISION_OUTPUT")],
                 outputs=[("clip_vision_output", "CLIP_VISION_OUTPUT"), ("pos_embed", "EMBEDS"),
                          ("neg_embed", "EMBEDS")],
                 widgets=[25, -1.0, seed, "fixed", False, False], pos=pos, size=(320, 250), title=title[1])
    g.link(opl, 0, app, "operator")
    g.link(a[0], a[1], app, "input_a")
    g.link(b[0], b[1], app, "input_b")
    return app


def _pops_texturing(g: Graph, clip_vision=("CLIPVisionLoader", POPS_CLIP_VISION),
                    operator=(POPS_OPERATOR, "(in the operator file)", "auto")):
    """Two photos -> CLIP Vision Encode (ViT-bigG) -> texturing operator; returns (clip vision loader, apply)."""
    cvl = g.node(clip_vision[0], outputs=[("CLIP_VISION", "CLIP_VISION")], widgets=[clip_vision[1]],
                 pos=(20, 20), size=(320, 60), title="CLIP vision ViT-bigG/14")
    enc_a = _pops_encode(g, cvl, "A: the object", (20, 130))
    enc_b = _pops_encode(g, cvl, "B: the texture", (20, 480))
    app = _pops_apply(g, operator, (enc_a, 0), (enc_b, 0), 42, (720, 300),
                      ("Texturing operator", "Operator Apply: A textured with B"))
    return cvl, app


def _pops_render_revision(g: Graph, embed_src, prefix: str, x: int = 1100):
    unet = g.node("UNETLoader", outputs=[("MODEL", "MODEL")], widgets=[POPS_UNET, "default"], pos=(x, 20),
                  size=(320, 80), title="SDXL model")
    rev = g.node("PhotoOps_PopsRevisionConditioning",
                 inputs=[("model", "MODEL"), ("clip_vision_output", "CLIP_VISION_OUTPUT")],
                 outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")], widgets=[1.0, 0.0],
                 pos=(x, 140), size=(320, 100))
    lat = g.node("EmptyLatentImage", outputs=[("LATENT", "LATENT")], widgets=[64, 64, 1], pos=(x, 290),
                 size=(300, 110))
    ks = g.node("KSampler", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                    ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")],
                widgets=[0, "fixed", 2, 4.0, "euler", "normal", 1.0], pos=(x + 360, 20), size=(315, 262))
    vae = g.node("VAELoader", outputs=[("VAE", "VAE")], widgets=[POPS_VAE], pos=(x + 360, 320), size=(300, 60))
    dec = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 pos=(x + 720, 20), size=(210, 46))
    save = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=[prefix], pos=(x + 960, 20), size=(260, 280))
    g.link(unet, 0, rev, "model")
    g.link(embed_src[0], embed_src[1], rev, "clip_vision_output")
    g.link(unet, 0, ks, "model")
    g.link(rev, 0, ks, "positive")
    g.link(rev, 1, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, save, "images")


POPS_NOTE = (" The file names are the tiny random CI fixtures: pick ViT-bigG/14 (clip_vision_g), an operator from "
             "pOpsPaper/operators in models/pops (statistics: the Kandinsky 2.2 prior file, or convert once with "
             "tools/convert_pops.py), the SDXL base UNet (or a checkpoint's MODEL) and VAE, 1024x1024, ~30 steps.")


def pops_texturing_sdxl() -> dict:
    g = Graph()
    _, app = _pops_texturing(g)
    _pops_render_revision(g, (app, 0), "photoops_pops_texturing")
    return g.to_json("pOps texturing (Richardson et al. 2024): the operator maps the CLIP image embeddings of an "
                     "object (A) and a texture patch (B) to one embedding, rendered by SDXL through its image-"
                     "embedding (revision) input with an empty text prompt." + POPS_NOTE)


def pops_chain_sdxl() -> dict:
    g = Graph()
    cvl, app = _pops_texturing(g)
    enc_c = _pops_encode(g, cvl, "C: the scene", (20, 830))
    app2 = _pops_apply(g, (POPS_OPERATOR2, "(in the operator file)", "auto"), (app, 0), (enc_c, 0), 18, (720, 830),
                       ("Scene operator", "Operator Apply: (A textured with B) placed in C"))
    _pops_render_revision(g, (app2, 0), "photoops_pops_chain")
    return g.to_json("Chained pOps operators (a generative equation): texturing(A, B), then scene(result, C). "
                     "Operator outputs are CLIP_VISION_OUTPUTs, so they feed the next operator directly." + POPS_NOTE)


IPADAPTER_PACK_NOTE = ("Needs the third-party node pack ComfyUI_IPAdapter_plus (cubiq, "
                       "https://github.com/cubiq/ComfyUI_IPAdapter_plus) installed in custom_nodes/: it provides "
                       "IPAdapter Model Loader and IPAdapter Embeds. Without it these two nodes show as missing.")
POPS_IPADAPTER = "photoops_tiny_ip-adapter_sdxl.safetensors"  # users: ip-adapter_sdxl.safetensors (ViT-bigG)
IPADAPTER_EMBEDS_WIDGETS = [1.0, "linear", 0.0, 1.0, "V only"]  # weight, weight_type, start_at, end_at, embeds_scaling


def _pops_ipadapter(g: Graph, app, model_src, x: int = 1100):
    """IPAdapter_plus: IPAdapterModelLoader + IPAdapterEmbeds(model, ipadapter, pos_embed, neg_embed) -> MODEL."""
    ipl = g.node("IPAdapterModelLoader", outputs=[("IPADAPTER", "IPADAPTER")], widgets=[model_src[2]],
                 pos=(x, 200), size=(320, 60))
    ipe = g.node("IPAdapterEmbeds", inputs=[("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("pos_embed", "EMBEDS"),
                                            ("neg_embed", "EMBEDS"), ("attn_mask", "MASK"),
                                            ("clip_vision", "CLIP_VISION")],
                 outputs=[("MODEL", "MODEL")], widgets=list(IPADAPTER_EMBEDS_WIDGETS), pos=(x + 360, 20),
                 size=(320, 240))
    g.link(model_src[0], model_src[1], ipe, "model")
    g.link(ipl, 0, ipe, "ipadapter")
    g.link(app, 1, ipe, "pos_embed")
    g.link(app, 2, ipe, "neg_embed")
    return ipe


def pops_ipadapter_sdxl() -> dict:
    """CI-sized (tiny fixtures; run over HTTP by tests/test_comfy_ipadapter.py when the pack is installed)."""
    g = Graph()
    _, app = _pops_texturing(g)
    unet = g.node("UNETLoader", outputs=[("MODEL", "MODEL")], widgets=[POPS_UNET, "default"], pos=(1100, 20),
                  size=(320, 80), title="SDXL model")
    ipe = _pops_ipadapter(g, app, (unet, 0, POPS_IPADAPTER))
    rev = g.node("PhotoOps_PopsRevisionConditioning",
                 inputs=[("model", "MODEL"), ("clip_vision_output", "CLIP_VISION_OUTPUT")],
                 outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")], widgets=[0.0, 0.0],
                 pos=(1460, 300), size=(320, 100), title="No text (zero context; strength 0: no revision input)")
    lat = g.node("EmptyLatentImage", outputs=[("LATENT", "LATENT")], widgets=[64, 64, 1], pos=(1460, 450),
                 size=(300, 110))
    ks = g.node("KSampler", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                    ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")],
                widgets=[0, "fixed", 2, 5.0, "euler", "normal", 1.0], pos=(1820, 20), size=(315, 262))
    vae = g.node("VAELoader", outputs=[("VAE", "VAE")], widgets=[POPS_VAE], pos=(1820, 320), size=(300, 60))
    dec = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 pos=(2170, 20), size=(210, 46))
    save = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=["photoops_pops_ipadapter"], pos=(2410, 20),
                  size=(260, 280))
    g.link(unet, 0, rev, "model")
    g.link(app, 0, rev, "clip_vision_output")
    g.link(ipe, 0, ks, "model")
    g.link(rev, 0, ks, "positive")
    g.link(rev, 1, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, save, "images")
    g.note(IPADAPTER_PACK_NOTE)
    return g.to_json("pOps texturing rendered with SDXL + IP-Adapter (as in the paper): Operator Apply's pos_embed/"
                     "neg_embed are IPAdapter_plus EMBEDS (image_embeds and zeros, the non-plus IPAdapterEncoder "
                     "format) for IPAdapterEmbeds. Needs cubiq/ComfyUI_IPAdapter_plus. CI-sized: tiny random "
                     "fixtures, no text encoder (the revision node at strength 0 only supplies zero text "
                     "conditioning, so the image comes from the IP-Adapter alone), 64x64, 2 steps. For real use "
                     "see pops_ipadapter_sdxl_paper.json (sd_xl_base checkpoint, empty prompt, the paper's negative "
                     "prompt, ip-adapter_sdxl.safetensors, the ViT-bigG variant; _vit-h and plus adapters do not "
                     "fit 1280-d bigG embeddings)." + POPS_NOTE)


def pops_ipadapter_sdxl_paper() -> dict:
    """The paper's settings with real files (never run here: SDXL base and its text encoders are not in CI)."""
    g = Graph()
    _, app = _pops_texturing(g, clip_vision=("CLIPVisionLoader", "clip_vision_g.safetensors"),
                             operator=("texturing/learned_prior.pth", "kandinsky-2-2-prior.safetensors", "auto"))
    ckpt = g.node("CheckpointLoaderSimple", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                  widgets=["sd_xl_base_1.0.safetensors"], pos=(1100, 20))
    ipe = _pops_ipadapter(g, app, (ckpt, 0, "ip-adapter_sdxl.safetensors"))
    pos = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                 widgets=[""], pos=(1460, 300), title="Prompt (empty, as in the paper)", size=(380, 100))
    neg = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                 widgets=["deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality"],
                 pos=(1460, 440), title="Negative prompt (paper)", size=(380, 120))
    lat = g.node("EmptyLatentImage", outputs=[("LATENT", "LATENT")], widgets=[1024, 1024, 1], pos=(1460, 600))
    ks = g.node("KSampler", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                    ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")],
                widgets=[0, "fixed", 50, 5.0, "dpmpp_2m", "karras", 1.0], pos=(1880, 20), size=(315, 262))
    dec = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 pos=(2230, 20), size=(210, 46))
    save = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=["photoops_pops_ipadapter"], pos=(2470, 20),
                  size=(260, 280))
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    g.link(ipe, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(ckpt, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    g.note(IPADAPTER_PACK_NOTE)
    return g.to_json("pOps texturing rendered with SDXL + IP-Adapter at the paper's settings (ip-adapter_sdxl, the "
                     "ViT-bigG variant; empty prompt, the paper's negative prompt, 50 steps, weight 1): Operator "
                     "Apply's pos_embed/neg_embed are IPAdapter_plus EMBEDS. Needs cubiq/ComfyUI_IPAdapter_plus; "
                     "its _vit-h and plus adapters do not fit 1280-d bigG embeddings. Its node signatures are "
                     "checked in CI (tests/test_comfy_ipadapter.py); it is not run there (no SDXL files).")


WORKFLOWS = {"attention_mask.json": attention_mask, "inversion_reconstruct.json": inversion_reconstruct,
             "inversion_ddpm_edit.json": inversion_ddpm_edit, "inversion_eta_edit.json": inversion_eta_edit,
             "ledits_edit.json": ledits_edit, "ledits_pp_edit.json": ledits_pp_edit,
             "concept_learn.json": concept_learn}


# pOps (issue 6).  All files sit directly in workflows/: ComfyUI's template browser lists only
# workflows/*.json.  The IP-Adapter pair needs ComfyUI_IPAdapter_plus; the tests route them by the
# rule in tests/comfy_harness/third_party.py (core-only server: skipped; tests/test_comfy_ipadapter.py).
WORKFLOWS.update({"pops_texturing_sdxl.json": pops_texturing_sdxl, "pops_chain_sdxl.json": pops_chain_sdxl,
                  "pops_ipadapter_sdxl.json": pops_ipadapter_sdxl,
                  "pops_ipadapter_sdxl_paper.json": pops_ipadapter_sdxl_paper})


# ---- InstructBrush (issue 8) ---------------------------------------------------------------
IP2P_CKPT = "photoops_tiny_sd15_ip2p.safetensors"      # users: an InstructPix2Pix checkpoint (instruct-pix2pix)


def instructbrush_learn_apply() -> dict:
    """Two before/after pairs -> Instruction Learn -> Instruction Apply -> edit a new photo with core
    InstructPixToPixConditioning + DualCFGGuider + SamplerCustomAdvanced.  The PNGs come from
    ``tools.toyworld.ip2p.write_example_photos('workflows')``."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                  widgets=[IP2P_CKPT], pos=(20, 40), title="InstructPix2Pix checkpoint")
    imgs = {}
    for i, name in enumerate(("before_1", "after_1", "before_2", "after_2")):
        imgs[name] = g.node("LoadImage", outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                            widgets=[f"instructbrush_{name}.png", "image"], pos=(20 + 230 * (i % 2), 220 + 300 * (i // 2)),
                            size=(220, 290), title=name.replace("_", " "))
    bb = g.node("ImageBatch", inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")],
                pos=(480, 220), size=(200, 50), title="before images")
    ab = g.node("ImageBatch", inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")],
                pos=(480, 320), size=(200, 50), title="after images")
    learn = g.node("PhotoOps_InstructionLearn",
                   inputs=[("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("before", "IMAGE"),
                           ("after", "IMAGE")],
                   outputs=[("instruction", "PHOTOOPS_INSTRUCTION"), ("prompt", "STRING")],
                   widgets=["make it blue", "instructbrush_demo", 4, 0.001, 0, "fixed", 5, 1, False, 100, True],
                   pos=(720, 40), size=(360, 420), title="Instruction Learn (4 steps for the demo; use 1000)")
    apply_ = g.node("PhotoOps_InstructionApply",
                    inputs=[("model", "MODEL"), ("clip", "CLIP"), ("instruction", "PHOTOOPS_INSTRUCTION")],
                    outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("prompt", "STRING")],
                    widgets=[1.0], pos=(1120, 40), size=(300, 130))
    photo = g.node("LoadImage", outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                   widgets=["instructbrush_photo.png", "image"], pos=(1120, 220), size=(260, 300), title="New photo")
    empty = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
                   widgets=[""], pos=(1120, 560), title="Empty prompt", size=(300, 100))
    ip2p = g.node("InstructPixToPixConditioning",
                  inputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                          ("pixels", "IMAGE")],
                  outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
                  pos=(1460, 40), size=(280, 110))
    guider = g.node("DualCFGGuider",
                    inputs=[("model", "MODEL"), ("cond1", "CONDITIONING"), ("cond2", "CONDITIONING"),
                            ("negative", "CONDITIONING")],
                    outputs=[("GUIDER", "GUIDER")], widgets=[7.5, 1.5, "regular"], pos=(1460, 200),
                    size=(300, 170), title="DualCFGGuider (text 7.5, image 1.5: IP2P guidance)")
    noise = g.node("RandomNoise", outputs=[("NOISE", "NOISE")], widgets=[0, "fixed"], pos=(1460, 410))
    sampler = g.node("KSamplerSelect", outputs=[("SAMPLER", "SAMPLER")], widgets=["euler_ancestral"],
                     pos=(1460, 520))
    sched = g.node("BasicScheduler", inputs=[("model", "MODEL")], outputs=[("SIGMAS", "SIGMAS")],
                   widgets=["normal", 4, 1.0], pos=(1460, 620), title="BasicScheduler (4 steps for the demo; use 50)")
    sca = g.node("SamplerCustomAdvanced",
                 inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                         ("latent_image", "LATENT")],
                 outputs=[("output", "LATENT"), ("denoised_output", "LATENT")], pos=(1800, 40), size=(270, 110))
    dec = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 pos=(1800, 200), size=(210, 46))
    save = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=["photoops_instructbrush"], pos=(1800, 300),
                  size=(260, 280))
    g.link(imgs["before_1"], 0, bb, "image1")
    g.link(imgs["before_2"], 0, bb, "image2")
    g.link(imgs["after_1"], 0, ab, "image1")
    g.link(imgs["after_2"], 0, ab, "image2")
    g.link(ckpt, 0, learn, "model")
    g.link(ckpt, 1, learn, "clip")
    g.link(ckpt, 2, learn, "vae")
    g.link(bb, 0, learn, "before")
    g.link(ab, 0, learn, "after")
    g.link(ckpt, 0, apply_, "model")
    g.link(ckpt, 1, apply_, "clip")
    g.link(learn, 0, apply_, "instruction")
    g.link(ckpt, 1, empty, "clip")
    g.link(apply_, 1, ip2p, "positive")
    g.link(empty, 0, ip2p, "negative")
    g.link(ckpt, 2, ip2p, "vae")
    g.link(photo, 0, ip2p, "pixels")
    g.link(apply_, 0, guider, "model")
    g.link(ip2p, 0, guider, "cond1")
    g.link(ip2p, 1, guider, "cond2")
    g.link(empty, 0, guider, "negative")
    g.link(apply_, 0, sched, "model")
    g.link(noise, 0, sca, "noise")
    g.link(guider, 0, sca, "guider")
    g.link(sampler, 0, sca, "sampler")
    g.link(sched, 0, sca, "sigmas")
    g.link(ip2p, 2, sca, "latent_image")
    g.link(sca, 0, dec, "samples")
    g.link(ckpt, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    return g.to_json("InstructBrush (Zhao et al.): learn an editing instruction from before/after pairs (here two "
                     "pairs: object -> blue AND background -> black), saved to output/photoops_instructions, then "
                     "apply it to a new photo. Instruction Apply returns the patched model and the encoded initial "
                     "instruction; the rest is the standard InstructPix2Pix graph (InstructPixToPixConditioning, "
                     "DualCFGGuider with the plain empty prompt as 'negative' = no image, SamplerCustomAdvanced). "
                     "A saved instruction is reused with Load Instruction in place of Instruction Learn. Real use: "
                     "an instruct-pix2pix checkpoint, 5-10 pairs, 1000 steps, 50 sampling steps.")


WORKFLOWS.update({"instructbrush_learn_apply.json": instructbrush_learn_apply})


def main():
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        (out / name).write_text(json.dumps(build(), indent=1) + "\n")
        print("wrote", out / name)


if __name__ == "__main__":
    main()
