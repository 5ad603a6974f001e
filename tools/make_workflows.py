"""Write the workflows in ``workflows/``: what a user opens (ComfyUI UI format), at the papers' settings.

Run ``python tools/make_workflows.py``; the files are deterministic.  Each names the canonical model
files (SD1.5 ``v1-5-pruned-emaonly-fp16``, SDXL ``sd_xl_base_1.0``, InstructPix2Pix, ``clip_vision_g``,
the released pOps operators, ``ip-adapter_sdxl``, SD3.5 Medium, FLUX.1-dev and their text
encoders and VAE) with the frontend's download metadata
(``properties.models``: name, url, directory, as ComfyUI's own templates carry it), edits one of the
real photos of ``tools/make_photos.py`` and explains itself in a MarkdownNote; groups mark the stages.
The tests run exactly these files, shrunk by the override table in ``tests/comfy_harness/overrides.py``.

Layout: every graph is a list of stages (a group each), every stage a list of columns; nodes stack in
their column with room for LiteGraph's title bar, so no two nodes overlap (the browser test measures
the rendered rectangles).
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEMANTIC_MASK_RULE = "otsu"   # the Semantic Guide default (nodes/semantic_guide.py DEFAULT_MASK_RULE)

# ---- models: what each loader names, and where the frontend offers to download it from -----------
HF = "https://huggingface.co"
SD15 = {"name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
        "url": f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors"}
SDXL = {"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
        "url": f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"}
IP2P = {"name": "instruct-pix2pix-00-22000.safetensors", "directory": "checkpoints",
        "url": f"{HF}/timbrooks/instruct-pix2pix/resolve/main/instruct-pix2pix-00-22000.safetensors"}
CLIP_VISION_G = {"name": "clip_vision_g.safetensors", "directory": "clip_vision",
                 "url": f"{HF}/comfyanonymous/clip_vision_g/resolve/main/clip_vision_g.safetensors"}
IPADAPTER_SDXL = {"name": "ip-adapter_sdxl.safetensors", "directory": "ipadapter",
                  "url": f"{HF}/h94/IP-Adapter/resolve/main/sdxl_models/ip-adapter_sdxl.safetensors"}
POPS_TEXTURING = {"name": "texturing/learned_prior.pth", "directory": "pops",
                  "url": f"{HF}/pOpsPaper/operators/resolve/main/models/texturing/learned_prior.pth"}
POPS_SCENE = {"name": "scene/learned_prior.pth", "directory": "pops",
              "url": f"{HF}/pOpsPaper/operators/resolve/main/models/scene/learned_prior.pth"}
KANDINSKY_PRIOR = {"name": "kandinsky-2-2-prior.safetensors", "directory": "pops",
                   "url": f"{HF}/kandinsky-community/kandinsky-2-2-prior/resolve/main/prior/"
                          "diffusion_pytorch_model.safetensors"}
# SD3.5 and Flux (issue 19): the files ComfyUI's own SD3.5 / Flux examples use.  The stabilityai and
# black-forest-labs repositories are gated (accept the licence on Hugging Face once); CLIP-L and T5-XXL are
# the same files for both families, from comfyanonymous/flux_text_encoders.
SD35_MEDIUM = {"name": "sd3.5_medium.safetensors", "directory": "checkpoints",
               "url": f"{HF}/stabilityai/stable-diffusion-3.5-medium/resolve/main/sd3.5_medium.safetensors"}
CLIP_L = {"name": "clip_l.safetensors", "directory": "text_encoders",
          "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"}
CLIP_G = {"name": "clip_g.safetensors", "directory": "text_encoders",
          "url": f"{HF}/stabilityai/stable-diffusion-3.5-medium/resolve/main/text_encoders/clip_g.safetensors"}
T5XXL = {"name": "t5xxl_fp16.safetensors", "directory": "text_encoders",
         "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"}
FLUX_DEV = {"name": "flux1-dev.safetensors", "directory": "diffusion_models",
            "url": f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"}
FLUX_AE = {"name": "ae.safetensors", "directory": "vae",
           "url": f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors"}
#: every model a shipped workflow may name (tests check loaders against this list)
ALL_MODELS = (SD15, SDXL, IP2P, CLIP_VISION_G, IPADAPTER_SDXL, POPS_TEXTURING, POPS_SCENE, KANDINSKY_PRIOR,
              SD35_MEDIUM, CLIP_L, CLIP_G, T5XXL, FLUX_DEV, FLUX_AE)

# ---- photos (tools/make_photos.py; sources and licences in the README) -----------------------------
CAT, COFFEE, ROCKET, ASTRONAUT, BRICK = ("photoops_cat.jpg", "photoops_coffee.jpg", "photoops_rocket.jpg",
                                         "photoops_astronaut.jpg", "photoops_brick.jpg")
PHOTO_CREDIT = {CAT: "'Chelsea' by Stefan van der Walt, CC0", COFFEE: "coffee by Rachel Michetti, CC0",
                ROCKET: "SpaceX, public domain", ASTRONAUT: "NASA, public domain",
                BRICK: "CC0Textures Bricks25, CC0"}
PHOTOS_NOTE = ("The photo comes with the pack: copy `custom_nodes/photoops/workflows/*.jpg` into ComfyUI's "
               "`input/` folder once (or load your own).")

TITLE_H = 30      # LiteGraph's title bar, drawn above ``pos``
GAP_X, GAP_Y = 50, 40
GROUP_PAD, GROUP_TITLE = 15, 45
TOP = 30 + GROUP_TITLE + TITLE_H

# heights of what a node draws besides its slots and one-line widgets
EXTRA_H = {"LoadImage": 300, "SaveImage": 280, "PreviewImage": 280, "PhotoOps_EtaSchedule": 190}
MULTILINE = {"CLIPTextEncode": {0}, "PhotoOps_AttentionCapture": {0}, "PhotoOps_ConceptLearn": set(),
             "PhotoOps_InstructionLearn": set()}
WIDE = {"CLIPTextEncode": 420, "PhotoOps_ConceptLearn": 380, "PhotoOps_InstructionLearn": 380,
        "PhotoOps_Invert": 360, "PhotoOps_SemanticGuide": 340, "PhotoOps_AttentionCapture": 360,
        "PhotoOps_EtaSchedule": 340, "SamplerCustomAdvanced": 300, "VAEDecode": 220, "VAEEncode": 220,
        "DisableNoise": 220, "ImageBatch": 220, "MaskToImage": 220, "PhotoOps_OperatorApply": 360,
        "TripleCLIPLoader": 340, "DualCLIPLoader": 340, "UNETLoader": 340, "PhotoOps_FlowEditGuider": 320,
        "PhotoOps_FlowEditSampler": 300, "ConditioningZeroOut": 260}


def _size(type_, inputs, outputs, widgets) -> list:
    """A generous box for the node: slots, one-line widgets, multi-line text, image previews."""
    n_widgets = len(widgets or ())
    multiline = len(MULTILINE.get(type_, ()))
    h = 16 + 24 * max(len(inputs), len(outputs), 1) + 26 * n_widgets + 90 * multiline + EXTRA_H.get(type_, 0)
    return [WIDE.get(type_, 320), h]


class Graph:
    """UI-format graph builder: nodes with positional widgets and typed links, laid out by stage."""

    def __init__(self):
        self.nodes, self.links, self.groups = [], [], []

    def node(self, type_, inputs=(), outputs=(), widgets=None, title=None, size=None, models=None):
        nid = len(self.nodes) + 1
        n = {"id": nid, "type": type_, "pos": [0, 0], "size": list(size or _size(type_, inputs, outputs, widgets)),
             "flags": {}, "order": nid - 1, "mode": 0,
             "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs],
             "outputs": [{"name": name, "type": t, "links": [], "slot_index": i} for i, (name, t) in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}}
        if models:
            n["properties"]["models"] = [dict(m) for m in models]
        if widgets is not None:
            n["widgets_values"] = list(widgets)
        if title:
            n["title"] = title
        self.nodes.append(n)
        return nid

    def note(self, markdown: str, width: int = 440, height: int = 560):
        return self.node("MarkdownNote", widgets=[markdown], size=(width, height), title="Read me")

    def link(self, src, src_slot, dst, dst_input):
        s = self.nodes[src - 1]
        d = self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == dst_input)
        t = s["outputs"][src_slot]["type"]
        lid = len(self.links) + 1
        self.links.append([lid, src, src_slot, dst, slot, t])
        s["outputs"][src_slot]["links"].append(lid)
        d["inputs"][slot]["link"] = lid

    def layout(self, note: int, stages) -> None:
        """``stages``: [(group title, [[node ids of column 1], [column 2], ...]), ...], left to right after
        the note.  Each stage gets a group around its nodes."""
        n = self.nodes[note - 1]
        n["pos"] = [20, TOP]
        x = 20 + n["size"][0] + GAP_X + GROUP_PAD
        placed = {note}
        for title, columns in stages:
            x0, bottom = x, TOP
            for col in columns:
                y = TOP
                for nid in col:
                    assert nid not in placed, f"node {nid} placed twice"
                    placed.add(nid)
                    node = self.nodes[nid - 1]
                    node["pos"] = [x, y]
                    y += node["size"][1] + GAP_Y + TITLE_H
                bottom = max(bottom, y - GAP_Y - TITLE_H)
                x += max(self.nodes[i - 1]["size"][0] for i in col) + GAP_X
            right = x - GAP_X
            self.groups.append({"title": title, "bounding": [x0 - GROUP_PAD, TOP - TITLE_H - GROUP_TITLE,
                                                            right - x0 + 2 * GROUP_PAD,
                                                            bottom - TOP + TITLE_H + GROUP_TITLE + GROUP_PAD],
                                "color": "#3f789e", "font_size": 24, "flags": {}})
            x += 2 * GROUP_PAD + 30
        missing = {nd["id"] for nd in self.nodes} - placed
        assert not missing, f"nodes without a place: {sorted(missing)}"

    def to_json(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {}, "extra": {}, "version": 0.4}


# ---- building blocks ---------------------------------------------------------------------------------
def checkpoint(g: Graph, model: dict, title: str | None = None):
    return g.node("CheckpointLoaderSimple", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                  widgets=[model["name"]], title=title, models=[model])


def text(g: Graph, ckpt_or_clip, value: str, title: str, slot: int = 1):
    n = g.node("CLIPTextEncode", inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
               widgets=[value], title=title)
    g.link(ckpt_or_clip, slot, n, "clip")
    return n


def load_image(g: Graph, name: str, title: str):
    return g.node("LoadImage", outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], widgets=[name, "image"], title=title)


def scale_image(g: Graph, image, size: int, title: str | None = None):
    """Core ImageScale to size x size, centre crop: the model's native resolution."""
    n = g.node("ImageScale", inputs=[("image", "IMAGE")], outputs=[("IMAGE", "IMAGE")],
               widgets=["lanczos", size, size, "center"], title=title or f"Resize to {size}x{size}")
    g.link(image, 0, n, "image")
    return n


def save_image(g: Graph, src, prefix: str, title: str | None = None, slot: int = 0):
    n = g.node("SaveImage", inputs=[("images", "IMAGE")], widgets=[prefix], title=title)
    g.link(src, slot, n, "images")
    return n


def decode(g: Graph, samples, vae, vae_slot: int = 2):
    n = g.node("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")])
    g.link(samples, 0, n, "samples")
    g.link(vae, vae_slot, n, "vae")
    return n


def ksampler(g: Graph, model, positive, negative, latent, seed, steps, cfg, sampler, scheduler, model_slot=0):
    n = g.node("KSampler", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                   ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")],
               widgets=[seed, "fixed", steps, cfg, sampler, scheduler, 1.0])
    g.link(model, model_slot, n, "model")
    g.link(positive[0], positive[1], n, "positive")
    g.link(negative[0], negative[1], n, "negative")
    g.link(latent, 0, n, "latent_image")
    return n


def empty_latent(g: Graph, size: int):
    return g.node("EmptyLatentImage", outputs=[("LATENT", "LATENT")], widgets=[size, size, 1])


def md(title: str, what: str, models: list, knobs: list, photo: str | None = None, extra: str = "") -> str:
    lines = [f"## {title}", "", what, "", "**Models** (the loader offers the download when a file is missing):"]
    lines += [f"- `{m['name']}` → `models/{m['directory']}/`" for m in models]
    lines += ["", "**Knobs that matter:**"] + [f"- {k}" for k in knobs]
    if photo:
        lines += ["", f"**Photo:** `{photo}` ({PHOTO_CREDIT[photo]}). {PHOTOS_NOTE}"]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


# ---- attention mask ------------------------------------------------------------------------------------
def attention_mask() -> dict:
    prompt = "a photo of a cat sitting on a wooden windowsill, soft daylight"
    g = Graph()
    note = g.note(md("Attention Mask: where a word goes",
                     "Attention Capture records the cross-attention of one word of the prompt while core KSampler "
                     "draws the image with the returned MODEL; Attention Mask turns the recording into a MASK and "
                     "a heat map (use the MASK for inpainting, IP-Adapter regions, or PhotoOps' background lock).",
                     [SD15], ["**word** on Attention Capture: any word (or words) of the prompt.",
                              "**layers**: `lowres` (16x16 maps, the cleanest) or `all`.",
                              "**mode / value** on Attention Mask: `quantile` 0.8 keeps the top 20 % of the map."]))
    ckpt = checkpoint(g, SD15)
    pos = text(g, ckpt, prompt, "Prompt")
    neg = text(g, ckpt, "blurry, low quality", "Negative prompt")
    cap = g.node("PhotoOps_AttentionCapture", inputs=[("model", "MODEL"), ("clip", "CLIP")],
                 outputs=[("MODEL", "MODEL"), ("capture", "PHOTOOPS_ATTENTION_CAPTURE")],
                 widgets=[prompt, "cat", "lowres", 0.0, 1.0], title="Attention Capture: the word 'cat'")
    g.link(ckpt, 0, cap, "model")
    g.link(ckpt, 1, cap, "clip")
    lat = empty_latent(g, 512)
    ks = ksampler(g, cap, (pos, 0), (neg, 0), lat, 42, 25, 7.0, "euler", "normal")
    dec = decode(g, ks, ckpt)
    save = save_image(g, dec, "photoops_attention_image")
    am = g.node("PhotoOps_AttentionMask", inputs=[("capture", "PHOTOOPS_ATTENTION_CAPTURE"), ("samples", "LATENT"),
                                                  ("image", "IMAGE")],
                outputs=[("mask", "MASK"), ("heatmap", "IMAGE")], widgets=["quantile", 0.8, 0.5, "image"])
    g.link(cap, 1, am, "capture")
    g.link(ks, 0, am, "samples")
    g.link(dec, 0, am, "image")
    heat = save_image(g, am, "photoops_attention_heatmap", "Heat map", slot=1)
    m2i = g.node("MaskToImage", inputs=[("mask", "MASK")], outputs=[("IMAGE", "IMAGE")])
    g.link(am, 0, m2i, "mask")
    msave = save_image(g, m2i, "photoops_attention_mask", "Mask")
    g.layout(note, [("1. Load and prompt", [[ckpt, lat], [pos, neg]]),
                    ("2. Sample while watching the word", [[cap], [ks, dec]]),
                    ("3. Mask and heat map", [[am, m2i], [save], [heat], [msave]])])
    return g.to_json()


# ---- inversion: reconstruct, DDPM edit, Eta edit ----------------------------------------------------------
COFFEE_SOURCE = "a cup of espresso on a red saucer on a wooden table"
COFFEE_TARGET = "a cup of espresso on a blue saucer on a wooden table"
CAT_SOURCE = "a close-up photo of a cat"
CAT_TARGET = "a close-up photo of a fox"


def _photo_in(g: Graph, ckpt, photo: str, size: int = 512):
    img = load_image(g, photo, "Your photo")
    sc = scale_image(g, img, size)
    enc = g.node("VAEEncode", inputs=[("pixels", "IMAGE"), ("vae", "VAE")], outputs=[("LATENT", "LATENT")])
    g.link(sc, 0, enc, "pixels")
    g.link(ckpt, 2, enc, "vae")
    return img, sc, enc


def _invert(g: Graph, model_src, positive, negative, enc, sched, method, skip, source_cfg, eta=None, region=None):
    inv = g.node("PhotoOps_Invert",
                 inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                         ("latent", "LATENT"), ("sigmas", "SIGMAS"), ("eta_schedule", "PHOTOOPS_ETA_SCHEDULE"),
                         ("region", "PHOTOOPS_ATTENTION_CAPTURE")],
                 outputs=[("inversion", "PHOTOOPS_INVERSION"), ("start_latent", "LATENT")],
                 widgets=[method, skip, source_cfg, 0, "fixed", "threshold", 0.2, 10, False, 1, 0.5, 0])
    g.link(model_src[0], model_src[1], inv, "model")
    g.link(positive, 0, inv, "positive")
    g.link(negative, 0, inv, "negative")
    g.link(enc, 0, inv, "latent")
    g.link(sched, 0, inv, "sigmas")
    if eta is not None:
        g.link(eta, 0, inv, "eta_schedule")
    if region is not None:
        g.link(region[0], region[1], inv, "region")
    return inv


def _replay(g: Graph, inv, guider, sched, ckpt, prefix, concept_masks=None, feather=8.0):
    smp = g.node("PhotoOps_InversionSampler", inputs=[("inversion", "PHOTOOPS_INVERSION"), ("lock_mask", "MASK"),
                                                      ("concept_masks", "PHOTOOPS_CONCEPT_MASKS")],
                 outputs=[("SAMPLER", "SAMPLER")], widgets=[feather, 0.25, 0.9, 0.0, 0.38, "off", 0.25])
    if concept_masks is not None:
        g.link(concept_masks[0], concept_masks[1], smp, "concept_masks")
    noise = g.node("DisableNoise", outputs=[("NOISE", "NOISE")])
    sca = g.node("SamplerCustomAdvanced", inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                                                  ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                 outputs=[("output", "LATENT"), ("denoised_output", "LATENT")])
    g.link(inv, 0, smp, "inversion")
    g.link(noise, 0, sca, "noise")
    g.link(guider, 0, sca, "guider")
    g.link(smp, 0, sca, "sampler")
    g.link(sched, 0, sca, "sigmas")
    g.link(inv, 1, sca, "latent_image")
    dec = decode(g, sca, ckpt)
    save = save_image(g, dec, prefix, "Result")
    return smp, noise, sca, dec, save


def _scheduler(g: Graph, ckpt, scheduler: str, steps: int):
    n = g.node("BasicScheduler", inputs=[("model", "MODEL")], outputs=[("SIGMAS", "SIGMAS")],
               widgets=[scheduler, steps, 1.0])
    g.link(ckpt, 0, n, "model")
    return n


def _cfg_guider(g: Graph, ckpt, positive, negative, cfg: float, title: str):
    n = g.node("CFGGuider", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
               outputs=[("GUIDER", "GUIDER")], widgets=[cfg], title=title)
    g.link(ckpt, 0, n, "model")
    g.link(positive, 0, n, "positive")
    g.link(negative, 0, n, "negative")
    return n


def inversion_reconstruct() -> dict:
    g = Graph()
    note = g.note(md("Invert a photo and get it back",
                     "Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024) stores one noise map per step; "
                     "the Inversion Sampler replays them in core SamplerCustomAdvanced. Replayed with the **same** "
                     "prompt and CFG, the output equals the photo up to the VAE: the check that everything is wired "
                     "right before you edit (see inversion_ddpm_edit).",
                     [SD15], ["Use the **same SIGMAS** for Invert and SamplerCustomAdvanced.",
                              "**source_cfg** on Invert must equal the CFGGuider's cfg for an exact replay.",
                              "**steps** on BasicScheduler: 50 here (the paper uses 100 for edits)."], COFFEE))
    ckpt = checkpoint(g, SD15)
    img, sc, enc = _photo_in(g, ckpt, COFFEE)
    src = text(g, ckpt, COFFEE_SOURCE, "Source prompt (describes the photo)")
    neg = text(g, ckpt, "", "Negative prompt (empty)")
    sched = _scheduler(g, ckpt, "ddim_uniform", 50)
    inv = _invert(g, (ckpt, 0), src, neg, enc, sched, "ddpm", 0, 3.5)
    guider = _cfg_guider(g, ckpt, src, neg, 3.5, "Same prompt, same CFG 3.5")
    smp, noise, sca, dec, save = _replay(g, inv, guider, sched, ckpt, "photoops_reconstruction")
    g.layout(note, [("1. Photo and prompts", [[ckpt, img], [sc, enc], [src, neg]]),
                    ("2. Invert", [[sched, inv]]),
                    ("3. Replay and decode", [[guider, smp, noise], [sca, dec], [save]])])
    return g.to_json()


def inversion_ddpm_edit() -> dict:
    g = Graph()
    note = g.note(md("Edit a photo by changing its caption (DDPM inversion)",
                     "Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024): invert with the caption of "
                     "the photo, replay the stored noise maps with a caption that says what should change (here "
                     "the saucer turns from red to blue). Paper settings: 100 steps, skip 36, source CFG 3.5, "
                     "target CFG 15.",
                     [SD15], ["**skip** on Invert: more keeps more of the photo's structure (paper 36 of 100).",
                              "**cfg** on the target CFGGuider: the strength of the edit (paper 15; 7-18).",
                              "**Target prompt**: change only the words of the edit."], COFFEE))
    ckpt = checkpoint(g, SD15)
    img, sc, enc = _photo_in(g, ckpt, COFFEE)
    src = text(g, ckpt, COFFEE_SOURCE, "Source prompt (describes the photo)")
    tgt = text(g, ckpt, COFFEE_TARGET, "Target prompt (the edit)")
    neg = text(g, ckpt, "", "Negative prompt (empty)")
    sched = _scheduler(g, ckpt, "ddim_uniform", 100)
    inv = _invert(g, (ckpt, 0), src, neg, enc, sched, "ddpm", 36, 3.5)
    guider = _cfg_guider(g, ckpt, tgt, neg, 15.0, "Target prompt, CFG 15")
    smp, noise, sca, dec, save = _replay(g, inv, guider, sched, ckpt, "photoops_ddpm_edit")
    g.layout(note, [("1. Photo and prompts", [[ckpt, img], [sc, enc], [src, tgt, neg]]),
                    ("2. Invert with the source prompt", [[sched, inv]]),
                    ("3. Replay with the target prompt", [[guider, smp, noise], [sca, dec], [save]])])
    return g.to_json()


def inversion_eta_edit() -> dict:
    g = Graph()
    note = g.note(md("Eta Inversion + Prompt-to-Prompt: the paper's edit",
                     "Eta Inversion (Kang et al. 2024) as the paper runs it: DDIM inversion, then a replay that adds "
                     "fresh noise with a time-dependent eta (the paper's function A, drawn on Eta Schedule) only "
                     "where the source word attends, under **Prompt-to-Prompt** attention control (Hertz et al. "
                     "2022): each step runs the source and target prompts in one batch, the target's attention is "
                     "taken from the source's early on, and the local blend keeps everything outside the cat / fox "
                     "exactly as in the photo. The inversion is also saved (output/photoops_inversions) to edit "
                     "again with Load Inversion. Paper settings: 50 steps, inversion CFG 1, editing CFG 7.5, cross "
                     "replace 0.4, self replace 0.6, the new word reweighted x2.",
                     [SD15], ["**source_prompt / target_prompt** on Prompt-to-Prompt Guide: change only the words "
                              "of the edit (`refine` aligns added words; `replace` swaps one word for one).",
                              "**cross_replace / self_replace**: how long the target keeps the photo's layout.",
                              "**Eta Schedule**: the preset and eta (the curve shows eta over the steps); **word** "
                              "on Attention Capture: where the noise may change the photo."], CAT))
    ckpt = checkpoint(g, SD15)
    img, sc, enc = _photo_in(g, ckpt, CAT)
    src = text(g, ckpt, CAT_SOURCE, "Source prompt (describes the photo)")
    neg = text(g, ckpt, "", "Negative prompt (empty)")
    cap = g.node("PhotoOps_AttentionCapture", inputs=[("model", "MODEL"), ("clip", "CLIP")],
                 outputs=[("MODEL", "MODEL"), ("capture", "PHOTOOPS_ATTENTION_CAPTURE")],
                 widgets=[CAT_SOURCE, "cat", "lowres", 0.0, 1.0], title="Edit region: the source word")
    g.link(ckpt, 0, cap, "model")
    g.link(ckpt, 1, cap, "clip")
    eta = g.node("PhotoOps_EtaSchedule", inputs=[("mask", "MASK")],
                 outputs=[("eta_schedule", "PHOTOOPS_ETA_SCHEDULE")], widgets=["paper_A", 0.4, "0:0, 0.6:0, 1:0.7", 1.0])
    sched = _scheduler(g, ckpt, "ddim_uniform", 50)
    inv = _invert(g, (cap, 0), src, neg, enc, sched, "eta", 0, 1.0, eta=eta, region=(cap, 1))
    sv = g.node("PhotoOps_SaveInversion", inputs=[("inversion", "PHOTOOPS_INVERSION")], widgets=["photoops_eta"])
    g.link(inv, 0, sv, "inversion")
    ptp = g.node("PhotoOps_PromptToPromptGuide",
                 inputs=[("model", "MODEL"), ("clip", "CLIP"), ("negative", "CONDITIONING")],
                 outputs=[("GUIDER", "GUIDER"), ("blend", "PHOTOOPS_CONCEPT_MASKS")],
                 widgets=[CAT_SOURCE, CAT_TARGET, 7.5, "refine", 0.4, 0.6, "fox", 2.0, "cat", "fox", 0.3, 0.2, "editing",
                          "threshold"],
                 title="Prompt-to-Prompt Guide: cat -> fox", size=(400, 520))
    g.link(ckpt, 0, ptp, "model")
    g.link(ckpt, 1, ptp, "clip")
    g.link(neg, 0, ptp, "negative")
    smp, noise, sca, dec, save = _replay(g, inv, ptp, sched, ckpt, "photoops_eta_edit", concept_masks=(ptp, 1),
                                         feather=0.0)
    g.layout(note, [("1. Photo and prompts", [[ckpt, img], [sc, enc], [src, neg]]),
                    ("2. Eta inversion of the word's region", [[cap, eta], [sched, inv, sv]]),
                    ("3. Replay under Prompt-to-Prompt control", [[ptp], [smp, noise], [sca, dec], [save]])])
    return g.to_json()


# ---- LEDITS / LEDITS++ ---------------------------------------------------------------------------------
def _concept(g: Graph, ckpt, text_, direction, scale, threshold, warmup, previous=None):
    c = g.node("PhotoOps_EditConcept", inputs=[("clip", "CLIP"), ("previous", "PHOTOOPS_EDIT_CONCEPTS")],
               outputs=[("concepts", "PHOTOOPS_EDIT_CONCEPTS")],
               widgets=[text_, direction, scale, threshold, warmup, -1, 1.0],
               title=f"Edit Concept: {direction} '{text_}'")
    g.link(ckpt, 1, c, "clip")
    if previous is not None:
        g.link(previous, 0, c, "previous")
    return c


def _semantic_edit(mode: str, title: str, what: str, knobs: list, photo: str, caption: str, concepts: list,
                   method: str, steps: int, skip: int, scheduler: str, prefix: str) -> dict:
    g = Graph()
    note = g.note(md(title, what, [SD15], knobs, photo))
    ckpt = checkpoint(g, SD15)
    img, sc, enc = _photo_in(g, ckpt, photo)
    src = text(g, ckpt, caption, "Target prompt (used only with use_target on)")
    neg = text(g, ckpt, "", "Empty prompt (inversion and unconditional)")
    prev, cnodes = None, []
    for args in concepts:
        prev = _concept(g, ckpt, *args, previous=prev)
        cnodes.append(prev)
    sg = g.node("PhotoOps_SemanticGuide", inputs=[("model", "MODEL"), ("positive", "CONDITIONING"),
                                                  ("negative", "CONDITIONING"),
                                                  ("concepts", "PHOTOOPS_EDIT_CONCEPTS")],
                outputs=[("GUIDER", "GUIDER"), ("masks", "PHOTOOPS_CONCEPT_MASKS")],
                widgets=[mode, 7.5, False, 0.3, 0.6, "intersect", SEMANTIC_MASK_RULE, 0.5],
                title=f"Semantic Guide ({'LEDITS' if mode == 'sega' else 'LEDITS++'})")
    g.link(ckpt, 0, sg, "model")
    g.link(src, 0, sg, "positive")
    g.link(neg, 0, sg, "negative")
    g.link(prev, 0, sg, "concepts")
    sched = _scheduler(g, ckpt, scheduler, steps)
    # inverted with the empty prompt at CFG 1, so the replay's unconditional branch (use_target off: pure
    # concept editing) reproduces the photo wherever no concept acts
    inv = _invert(g, (ckpt, 0), neg, neg, enc, sched, method, skip, 1.0)
    smp, noise, sca, dec, save = _replay(g, inv, sg, sched, ckpt, prefix)
    cm = g.node("PhotoOps_ConceptMasks", inputs=[("masks", "PHOTOOPS_CONCEPT_MASKS"), ("samples", "LATENT")],
                outputs=[("mask", "MASK"), ("heatmap", "IMAGE")], widgets=[len(concepts) - 1],
                title=f"Where '{concepts[-1][0]}' acted")
    g.link(sg, 1, cm, "masks")
    g.link(sca, 0, cm, "samples")
    msave = save_image(g, cm, prefix + "_concept_mask", "Concept mask", slot=1)
    g.layout(note, [("1. Photo and prompts", [[ckpt, img], [sc, enc], [src, neg]]),
                    ("2. Invert", [[sched, inv]]),
                    ("3. Edit concepts", [cnodes + [sg]]),
                    ("4. Replay with the concepts and decode", [[smp, noise], [sca, dec, cm], [save, msave]])])
    return g.to_json()


def ledits_edit() -> dict:
    return _semantic_edit(
        "sega", "LEDITS: edit a photo with concepts",
        "LEDITS (Tsaban & Passos 2023): edit-friendly DDPM inversion, replayed with SEGA semantic guidance: "
        "each Edit Concept pushes the image towards (add) or away from (remove) a word, here the cat becomes a "
        "dog. Pure concept editing (the paper's first workflow): the photo is inverted with the empty prompt and "
        "replayed without a target prompt (turn on use_target and write one for the paper's target CFG 15). "
        "Paper settings (Table 1): 100 steps, skip 36, concept scale 7, warm-up 1, threshold 0.95.",
        ["**scale** per concept: its strength (paper 7; 5-15).",
         "**threshold**: the share of the image a concept may touch (0.95 = its top 5 %).",
         "**skip** on Invert: structure kept from the photo (paper 36 of 100)."],
        CAT, CAT_SOURCE, [("cat", "remove", 7.0, 0.95, 1), ("dog", "add", 7.0, 0.95, 1)],
        "ddpm", 100, 36, "ddim_uniform", "photoops_ledits")


def ledits_pp_edit() -> dict:
    return _semantic_edit(
        "ledits++", "LEDITS++: masked concept edits",
        "LEDITS++ (Brack et al. 2024): its own exact inversion (Invert method dpmpp_2m_sde; only the steps after "
        "skip are inverted), concepts applied only inside implicit masks (cross-attention AND noise-estimate "
        "masks), so the rest of the photo stays: here the spoon goes and a cookie appears on the saucer. Paper "
        "defaults: about 30 edited steps after a 15 % skip, concept scale 5-7, threshold 0.9.",
        ["**scale** per concept: its strength.",
         "**threshold** per concept: the noise-estimate mask keeps values above this quantile.",
         ("**mask_rule** on Semantic Guide: `otsu` (default) does not depend on object size; `percentile` is "
          "the paper's.")],
        COFFEE, COFFEE_SOURCE, [("spoon", "remove", 5.0, 0.9, 0), ("cookie", "add", 7.0, 0.9, 0)],
        "dpmpp_2m_sde", 35, 5, "normal", "photoops_ledits_pp")


# ---- Concept Learn -------------------------------------------------------------------------------------
def concept_learn() -> dict:
    g = Graph()
    note = g.note(md("Concept Learn: new words from a photo",
                     "Concept Learn (Rahman et al.): one new token per concept plus its mask, learned by EM from "
                     "the photo(s) without user masks, saved as standard embeddings (`embeddings/cl_cup`, "
                     "`embeddings/cl_saucer`) that any later workflow or UI can use. The new prompt composes them as "
                     "`embedding:cl_cup` and `embedding:cl_saucer`; route the prompts' CLIP through Concept Learn so "
                     "they are encoded after training. 400 steps at 512 px: a minute or two on a recent GPU.",
                     [SD15], ["**concept_names / init_words**: one name and one starting word per concept.",
                              "**steps** (400) and **em_rounds** (4): mask refinements happen between rounds.",
                              "Add more photos of the same concepts with an Image Batch node."], COFFEE))
    ckpt = checkpoint(g, SD15)
    img = load_image(g, COFFEE, "Your photos (1-N)")
    cl = g.node("PhotoOps_ConceptLearn",
                inputs=[("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("images", "IMAGE"),
                        ("init_masks", "MASK")],
                outputs=[("clip", "CLIP"), ("masks", "MASK"), ("mask_preview", "IMAGE"), ("prompt_hint", "STRING"),
                         ("loss", "LOSS_MAP")],
                widgets=["cl_cup, cl_saucer", "cup, saucer", 400, 5e-4, 4, 0, "fixed", 512, 0.01, 1, True,
                         True, 100, False, "", "none", "union", False],
                title="Concept Learn")
    g.link(ckpt, 0, cl, "model")
    g.link(ckpt, 1, cl, "clip")
    g.link(ckpt, 2, cl, "vae")
    g.link(img, 0, cl, "images")
    msave = save_image(g, cl, "photoops_concept_masks", "Learned masks", slot=2)
    pos = text(g, cl, "a photo of a embedding:cl_cup on a embedding:cl_saucer on a beach", "New prompt with both "
               "concepts", slot=0)
    neg = text(g, cl, "blurry, low quality", "Negative prompt", slot=0)
    lat = empty_latent(g, 512)
    ks = ksampler(g, ckpt, (pos, 0), (neg, 0), lat, 42, 25, 7.0, "euler", "normal")
    dec = decode(g, ks, ckpt)
    save = save_image(g, dec, "photoops_concept_compose", "New image")
    g.layout(note, [("1. Learn the concepts", [[ckpt, img], [cl], [msave]]),
                    ("2. Use them in a new prompt", [[pos, neg, lat], [ks, dec], [save]])])
    return g.to_json()


# ---- pOps ----------------------------------------------------------------------------------------------
POPS_KNOBS = ["**seed** on Operator Apply: another sample of the operator's result.",
              "**guidance** on Operator Apply: -1 = the operator's own (texturing 8, scene 1).",
              "**strength** on pOps Revision Conditioning: how strongly SDXL follows the embedding."]
POPS_EXTRA = ("The operator .pth files come from Hugging Face `pOpsPaper/operators`; their CLIP statistics come "
              "from the Kandinsky 2.2 prior file (or convert once with `tools/convert_pops.py` into a single "
              ".safetensors and pick `(in the operator file)`).")


def _pops_encode(g: Graph, cvl, photo: str, title: str):
    img = load_image(g, photo, title)
    enc = g.node("CLIPVisionEncode", inputs=[("clip_vision", "CLIP_VISION"), ("image", "IMAGE")],
                 outputs=[("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")], widgets=["center"])
    g.link(cvl, 0, enc, "clip_vision")
    g.link(img, 0, enc, "image")
    return img, enc


def _pops_apply(g: Graph, operator: dict, a, b, seed, titles):
    opl = g.node("PhotoOps_PopsOperatorLoader", outputs=[("operator", "PHOTOOPS_POPS_OPERATOR")],
                 widgets=[operator["name"], KANDINSKY_PRIOR["name"], "auto"], title=titles[0],
                 models=[operator, KANDINSKY_PRIOR])
    app = g.node("PhotoOps_OperatorApply",
                 inputs=[("operator", "PHOTOOPS_POPS_OPERATOR"), ("input_a", "CLIP_VISION_OUTPUT"),
                         ("input_b", "CLIP_VISION_OUTPUT")],
                 outputs=[("clip_vision_output", "CLIP_VISION_OUTPUT"), ("pos_embed", "EMBEDS"),
                          ("neg_embed", "EMBEDS")],
                 widgets=[25, -1.0, seed, "fixed", False, False], title=titles[1])
    g.link(opl, 0, app, "operator")
    g.link(a, 0, app, "input_a")
    g.link(b, 0, app, "input_b")
    return opl, app


def _pops_inputs(g: Graph):
    cvl = g.node("CLIPVisionLoader", outputs=[("CLIP_VISION", "CLIP_VISION")], widgets=[CLIP_VISION_G["name"]],
                 title="CLIP vision ViT-bigG/14", models=[CLIP_VISION_G])
    img_a, enc_a = _pops_encode(g, cvl, COFFEE, "A: the object")
    img_b, enc_b = _pops_encode(g, cvl, BRICK, "B: the texture")
    opl, app = _pops_apply(g, POPS_TEXTURING, enc_a, enc_b, 42,
                           ("Texturing operator", "Operator Apply: A textured with B"))
    return cvl, (img_a, enc_a), (img_b, enc_b), (opl, app)


def _pops_render(g: Graph, embed_src, prefix: str):
    ckpt = checkpoint(g, SDXL, "SDXL base")
    rev = g.node("PhotoOps_PopsRevisionConditioning",
                 inputs=[("model", "MODEL"), ("clip_vision_output", "CLIP_VISION_OUTPUT")],
                 outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")], widgets=[1.0, 0.0])
    g.link(ckpt, 0, rev, "model")
    g.link(embed_src, 0, rev, "clip_vision_output")
    lat = empty_latent(g, 1024)
    ks = ksampler(g, ckpt, (rev, 0), (rev, 1), lat, 0, 30, 5.0, "dpmpp_2m", "karras")
    dec = decode(g, ks, ckpt)
    save = save_image(g, dec, prefix, "Result")
    return [ckpt, rev, lat], [ks, dec], [save]


def pops_texturing_sdxl() -> dict:
    g = Graph()
    note = g.note(md("pOps texturing: paint an object with a texture",
                     "pOps (Richardson et al. 2024): an operator maps the CLIP image embeddings of an object (A) "
                     "and a texture (B) to one embedding; SDXL renders it through its image-embedding (revision) "
                     "input with an empty text prompt. 25 prior steps, 1024x1024.",
                     [CLIP_VISION_G, POPS_TEXTURING, KANDINSKY_PRIOR, SDXL], POPS_KNOBS, COFFEE,
                     extra=POPS_EXTRA + f" The texture is `{BRICK}` ({PHOTO_CREDIT[BRICK]})."))
    cvl, (ia, ea), (ib, eb), (opl, app) = _pops_inputs(g)
    c1, c2, c3 = _pops_render(g, app, "photoops_pops_texturing")
    g.layout(note, [("1. Encode the two images", [[cvl, ia, ib], [ea, eb]]),
                    ("2. Apply the operator", [[opl, app]]),
                    ("3. Render with SDXL", [c1, c2, c3])])
    return g.to_json()


def pops_chain_sdxl() -> dict:
    g = Graph()
    note = g.note(md("pOps chain: texture, then place in a scene",
                     "Chained pOps operators (a generative equation): texturing(A, B), then scene(result, C). "
                     "Operator outputs are CLIP_VISION_OUTPUTs, so they feed the next operator directly.",
                     [CLIP_VISION_G, POPS_TEXTURING, POPS_SCENE, KANDINSKY_PRIOR, SDXL], POPS_KNOBS, COFFEE,
                     extra=POPS_EXTRA + f" Texture `{BRICK}` ({PHOTO_CREDIT[BRICK]}), scene `{ROCKET}` "
                                        f"({PHOTO_CREDIT[ROCKET]})."))
    cvl, (ia, ea), (ib, eb), (opl, app) = _pops_inputs(g)
    ic, ec = _pops_encode(g, cvl, ROCKET, "C: the scene")
    opl2, app2 = _pops_apply(g, POPS_SCENE, app, ec, 18,
                             ("Scene operator", "Operator Apply: (A textured with B) placed in C"))
    c1, c2, c3 = _pops_render(g, app2, "photoops_pops_chain")
    g.layout(note, [("1. Encode the three images", [[cvl, ia, ib, ic], [ea, eb, ec]]),
                    ("2. Apply the operators", [[opl, app], [opl2, app2]]),
                    ("3. Render with SDXL", [c1, c2, c3])])
    return g.to_json()


IPADAPTER_PACK_NOTE = ("Needs the third-party node pack **ComfyUI_IPAdapter_plus** (cubiq, "
                       "https://github.com/cubiq/ComfyUI_IPAdapter_plus) in `custom_nodes/`: it provides IPAdapter "
                       "Model Loader and IPAdapter Embeds. Without it these two nodes show as missing. Use the "
                       "ViT-bigG adapter `ip-adapter_sdxl`; the `_vit-h` and plus adapters do not fit 1280-d "
                       "embeddings.")
IPADAPTER_EMBEDS_WIDGETS = [1.0, "linear", 0.0, 1.0, "V only"]  # weight, weight_type, start_at, end_at, embeds_scaling


def pops_ipadapter_sdxl() -> dict:
    g = Graph()
    note = g.note(md("pOps texturing rendered with IP-Adapter (as in the paper)",
                     "Operator Apply's pos_embed / neg_embed are IPAdapter_plus EMBEDS (the result and zeros) for "
                     "IPAdapter Embeds; SDXL renders with an empty prompt and the paper's negative prompt, 50 steps, "
                     "adapter weight 1.",
                     [CLIP_VISION_G, POPS_TEXTURING, KANDINSKY_PRIOR, SDXL, IPADAPTER_SDXL],
                     ["**weight** on IPAdapter Embeds: how strongly the embedding drives SDXL.",
                      "**seed** on Operator Apply: another sample of the operator's result."], COFFEE,
                     extra=IPADAPTER_PACK_NOTE + " " + POPS_EXTRA))
    cvl, (ia, ea), (ib, eb), (opl, app) = _pops_inputs(g)
    ckpt = checkpoint(g, SDXL, "SDXL base")
    ipl = g.node("IPAdapterModelLoader", outputs=[("IPADAPTER", "IPADAPTER")], widgets=[IPADAPTER_SDXL["name"]],
                 models=[IPADAPTER_SDXL])
    ipe = g.node("IPAdapterEmbeds", inputs=[("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("pos_embed", "EMBEDS"),
                                            ("neg_embed", "EMBEDS"), ("attn_mask", "MASK"),
                                            ("clip_vision", "CLIP_VISION")],
                 outputs=[("MODEL", "MODEL")], widgets=list(IPADAPTER_EMBEDS_WIDGETS))
    g.link(ckpt, 0, ipe, "model")
    g.link(ipl, 0, ipe, "ipadapter")
    g.link(app, 1, ipe, "pos_embed")
    g.link(app, 2, ipe, "neg_embed")
    pos = text(g, ckpt, "", "Prompt (empty, as in the paper)")
    neg = text(g, ckpt, "deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality",
               "Negative prompt (paper)")
    lat = empty_latent(g, 1024)
    ks = ksampler(g, ipe, (pos, 0), (neg, 0), lat, 0, 50, 5.0, "dpmpp_2m", "karras")
    dec = decode(g, ks, ckpt)
    save = save_image(g, dec, "photoops_pops_ipadapter", "Result")
    g.layout(note, [("1. Encode the two images", [[cvl, ia, ib], [ea, eb]]),
                    ("2. Apply the operator", [[opl, app]]),
                    ("3. Render with SDXL + IP-Adapter", [[ckpt, ipl, ipe], [pos, neg, lat], [ks, dec], [save]])])
    return g.to_json()


# ---- InstructBrush -------------------------------------------------------------------------------------
def instructbrush_learn_apply() -> dict:
    """Three before/after pairs (tools/make_photos.py: a vintage sepia look) -> Instruction Learn ->
    Instruction Apply -> edit a new photo with core InstructPixToPixConditioning + DualCFGGuider +
    SamplerCustomAdvanced."""
    g = Graph()
    note = g.note(md("InstructBrush: learn an edit from examples",
                     "InstructBrush (Zhao et al.): learn an editing instruction from before/after pairs (here "
                     "three photos and the same photos in a vintage sepia look), saved to "
                     "`output/photoops_instructions`, then apply it to a new photo with InstructPix2Pix. The rest is "
                     "the standard IP2P graph: InstructPixToPixConditioning, DualCFGGuider (text 7.5, image 1.5) with "
                     "the plain empty prompt as negative, SamplerCustomAdvanced. Reuse a saved instruction with Load "
                     "Instruction in place of Instruction Learn. 1000 steps: about 10 minutes on a recent GPU.",
                     [IP2P], ["**steps** on Instruction Learn (1000) and the number of pairs (3-10).",
                              "**strength** on Instruction Apply: scales the learned instruction.",
                              "**cfg_conds / cfg_cond2_negative** on DualCFGGuider: text and image guidance."],
                     ASTRONAUT, extra="Pairs: the cat, the coffee and the rocket photos, centre-cropped to 512 px, "
                                      "and the same through a deterministic sepia filter (tools/make_photos.py)."))
    ckpt = checkpoint(g, IP2P, "InstructPix2Pix checkpoint")
    before = [load_image(g, f"instructbrush_before_{i}.jpg", f"before {i}") for i in (1, 2, 3)]
    after = [load_image(g, f"instructbrush_after_{i}.jpg", f"after {i}") for i in (1, 2, 3)]

    def batch(imgs, title):
        b1 = g.node("ImageBatch", inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")],
                    title=title + " 1+2")
        g.link(imgs[0], 0, b1, "image1")
        g.link(imgs[1], 0, b1, "image2")
        b2 = g.node("ImageBatch", inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")],
                    title=title + " 1+2+3")
        g.link(b1, 0, b2, "image1")
        g.link(imgs[2], 0, b2, "image2")
        return b1, b2, scale_image(g, b2, 512, f"{title} at 512x512")

    bb1, bb2, bsc = batch(before, "before")
    ab1, ab2, asc = batch(after, "after")
    learn = g.node("PhotoOps_InstructionLearn",
                   inputs=[("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("before", "IMAGE"),
                           ("after", "IMAGE")],
                   outputs=[("instruction", "PHOTOOPS_INSTRUCTION"), ("prompt", "STRING")],
                   widgets=["make it look like an old sepia photo", "vintage_sepia", 1000, 0.001, 0, "fixed", 5, 1,
                            False, 100, True],
                   title="Instruction Learn")
    g.link(ckpt, 0, learn, "model")
    g.link(ckpt, 1, learn, "clip")
    g.link(ckpt, 2, learn, "vae")
    g.link(bsc, 0, learn, "before")
    g.link(asc, 0, learn, "after")
    apply_ = g.node("PhotoOps_InstructionApply",
                    inputs=[("model", "MODEL"), ("clip", "CLIP"), ("instruction", "PHOTOOPS_INSTRUCTION")],
                    outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("prompt", "STRING")],
                    widgets=[1.0])
    g.link(ckpt, 0, apply_, "model")
    g.link(ckpt, 1, apply_, "clip")
    g.link(learn, 0, apply_, "instruction")
    photo = load_image(g, ASTRONAUT, "New photo")
    psc = scale_image(g, photo, 512)
    empty = text(g, ckpt, "", "Empty prompt")
    ip2p = g.node("InstructPixToPixConditioning",
                  inputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                          ("pixels", "IMAGE")],
                  outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")])
    g.link(apply_, 1, ip2p, "positive")
    g.link(empty, 0, ip2p, "negative")
    g.link(ckpt, 2, ip2p, "vae")
    g.link(psc, 0, ip2p, "pixels")
    guider = g.node("DualCFGGuider",
                    inputs=[("model", "MODEL"), ("cond1", "CONDITIONING"), ("cond2", "CONDITIONING"),
                            ("negative", "CONDITIONING")],
                    outputs=[("GUIDER", "GUIDER")], widgets=[7.5, 1.5, "regular"],
                    title="DualCFGGuider (text 7.5, image 1.5)")
    g.link(apply_, 0, guider, "model")
    g.link(ip2p, 0, guider, "cond1")
    g.link(ip2p, 1, guider, "cond2")
    g.link(empty, 0, guider, "negative")
    noise = g.node("RandomNoise", outputs=[("NOISE", "NOISE")], widgets=[0, "fixed"])
    sampler = g.node("KSamplerSelect", outputs=[("SAMPLER", "SAMPLER")], widgets=["euler_ancestral"])
    sched = _scheduler(g, apply_, "normal", 50)
    sca = g.node("SamplerCustomAdvanced",
                 inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                         ("latent_image", "LATENT")],
                 outputs=[("output", "LATENT"), ("denoised_output", "LATENT")])
    g.link(noise, 0, sca, "noise")
    g.link(guider, 0, sca, "guider")
    g.link(sampler, 0, sca, "sampler")
    g.link(sched, 0, sca, "sigmas")
    g.link(ip2p, 2, sca, "latent_image")
    dec = decode(g, sca, ckpt)
    save = save_image(g, dec, "photoops_instructbrush", "Result")
    g.layout(note, [("1. Example pairs", [[ckpt] + before, after, [bb1, bb2, bsc, ab1, ab2, asc]]),
                    ("2. Learn the instruction", [[learn, apply_]]),
                    ("3. Apply it to a new photo", [[photo, psc, empty], [ip2p, guider, noise, sampler, sched],
                                                    [sca, dec], [save]])])
    return g.to_json()


# ---- SD3.5 and Flux (issue 19) ------------------------------------------------------------------------
GATED = ("The stabilityai and black-forest-labs files are gated: accept the model's licence on its Hugging Face page "
         "(logged in) before the download works.")


def _flow_photo_in(g: Graph, vae, vae_slot: int, photo: str, size: int = 1024):
    img = load_image(g, photo, "Your photo")
    sc = scale_image(g, img, size)
    enc = g.node("VAEEncode", inputs=[("pixels", "IMAGE"), ("vae", "VAE")], outputs=[("LATENT", "LATENT")])
    g.link(sc, 0, enc, "pixels")
    g.link(vae, vae_slot, enc, "vae")
    return img, sc, enc


def _sca(g: Graph, noise, guider, sampler, sched, latent, latent_slot: int):
    n = g.node("SamplerCustomAdvanced", inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                                                ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
               outputs=[("output", "LATENT"), ("denoised_output", "LATENT")])
    g.link(noise, 0, n, "noise")
    g.link(guider, 0, n, "guider")
    g.link(sampler, 0, n, "sampler")
    g.link(sched, 0, n, "sigmas")
    g.link(latent, latent_slot, n, "latent_image")
    return n


def sd35_inversion_edit() -> dict:
    """SD3.5 Medium: flow noise-map inversion (spec rectified-flow.md §2.2: RF euler_ancestral, eta 1, the
    'simple' list, final 0 -> sigma_min, skip as a fraction) with the source caption, replayed by the
    Inversion Sampler in core SamplerCustomAdvanced with the target caption (caption swap), and the same
    replay with the source caption and CFG (reconstruction).  No paper fixes these settings for SD3; we take
    FlowEdit's SD3 ones (spec §2.4: T = 50, n_max = 33 -> skip 17, source CFG 3.5, target CFG 13.5)."""
    g = Graph()
    note = g.note(md("SD3.5: edit a photo by changing its caption (flow noise maps)",
                     "Edit-friendly noise-map inversion on a rectified-flow model: Invert (`flow_noise_maps`) "
                     "stores one noise map per step of ComfyUI's RF `euler_ancestral` sampler (eta 1), so that "
                     "replaying them returns the photo exactly; the Inversion Sampler replays them in core "
                     "SamplerCustomAdvanced. With the **target** caption the saucer turns from red to blue "
                     "(group 3); with the **source** caption and the same CFG the photo comes back (group 4: the "
                     "check that the wiring is right). Settings (FlowEdit's for SD3): 50 steps, skip 17, source "
                     "CFG 3.5, target CFG 13.5, 1024x1024, the model's own shift 3.",
                     [SD35_MEDIUM, CLIP_L, CLIP_G, T5XXL],
                     ["**skip** on Invert: more keeps more of the photo's structure (17 of 50).",
                      "**cfg** on the target CFGGuider: the strength of the edit (13.5; 7-15).",
                      ("**Target caption**: change only the words of the edit. Keep the SIGMAS shared by Invert "
                       "and both samplers.")], COFFEE,
                     extra=GATED + " `sd3.5_large.safetensors` works the same (Load Checkpoint)."),
                  height=620)
    ckpt = checkpoint(g, SD35_MEDIUM, "SD3.5 Medium")
    tclip = g.node("TripleCLIPLoader", outputs=[("CLIP", "CLIP")],
                   widgets=[CLIP_L["name"], CLIP_G["name"], T5XXL["name"]], title="SD3.5 text encoders",
                   models=[CLIP_L, CLIP_G, T5XXL])
    img, sc, enc = _flow_photo_in(g, ckpt, 2, COFFEE)
    src = text(g, tclip, COFFEE_SOURCE, "Source caption (describes the photo)", slot=0)
    tgt = text(g, tclip, COFFEE_TARGET, "Target caption (the edit)", slot=0)
    neg = text(g, tclip, "", "Negative prompt (empty)", slot=0)
    sched = _scheduler(g, ckpt, "simple", 50)
    inv = _invert(g, (ckpt, 0), src, neg, enc, sched, "flow_noise_maps", 17, 3.5)
    guider = _cfg_guider(g, ckpt, tgt, neg, 13.5, "Target caption, CFG 13.5")
    smp = g.node("PhotoOps_InversionSampler", inputs=[("inversion", "PHOTOOPS_INVERSION"), ("lock_mask", "MASK"),
                                                      ("concept_masks", "PHOTOOPS_CONCEPT_MASKS")],
                 outputs=[("SAMPLER", "SAMPLER")], widgets=[8.0, 0.25, 0.9, 0.0, 0.38, "off", 0.25])
    g.link(inv, 0, smp, "inversion")
    noise = g.node("DisableNoise", outputs=[("NOISE", "NOISE")])
    sca = _sca(g, noise, guider, smp, sched, inv, 1)
    dec = decode(g, sca, ckpt)
    save = save_image(g, dec, "photoops_sd35_edit", "Edited")
    rguider = _cfg_guider(g, ckpt, src, neg, 3.5, "Source caption, same CFG 3.5")
    rsca = _sca(g, noise, rguider, smp, sched, inv, 1)
    rdec = decode(g, rsca, ckpt)
    rsave = save_image(g, rdec, "photoops_sd35_reconstruction", "Reconstruction (= the photo)")
    g.layout(note, [("1. Photo, models and captions", [[ckpt, tclip, img], [sc, enc], [src, tgt, neg]]),
                    ("2. Invert with the source caption", [[sched, inv]]),
                    ("3. Replay with the target caption", [[guider, smp, noise], [sca, dec], [save]]),
                    ("4. Replay with the source caption: the photo back", [[rguider], [rsca, rdec], [rsave]])])
    return g.to_json()


FLUX_SOURCE = "a close-up photo of a cat"
FLUX_TARGET = "a close-up photo of a fox"


def flux_flowedit() -> dict:
    """FLUX.1-dev: FlowEdit (spec rectified-flow.md §2.4, FLUX_exp.yaml): 28 steps, n_max 24, n_min 0, n_avg 1,
    no CFG (1 on both branches), the distilled guidance embed 1.5 on the source and 5.5 on the target
    (FluxGuidance), seed 10.  The default Flux shift (mu 1.15) is the paper's dynamic shift at 1024x1024."""
    g = Graph()
    note = g.note(md("Flux: FlowEdit, from one caption to another",
                     "FlowEdit (Kulikov et al. 2024): no inversion. At each step the photo is noised afresh and the "
                     "edit moves along the difference of the target and source velocities, so what both captions "
                     "share stays as in the photo: here the cat becomes a fox. The paper's FLUX.1-dev settings: 28 "
                     "steps, edit during the last 24 (n_max), guidance 1.5 on the source and 5.5 on the target "
                     "(FluxGuidance; FlowEdit Guider CFG 1 on both: Flux-dev has no real CFG), seed 10, "
                     "1024x1024. With the target caption equal to the source (and the same guidance) the output "
                     "is the photo.",
                     [FLUX_DEV, CLIP_L, T5XXL, FLUX_AE],
                     [("**n_max** on FlowEdit Sampler: more = a stronger edit, less of the photo's structure "
                       "(24 of 28; keep it below the steps)."),
                      "**guidance** on the target FluxGuidance: the strength of the edit (5.5).",
                      "**Target caption**: say what changes, keep the rest of the source caption."], CAT,
                     extra=GATED + " The Flux shift is the model's default (the paper's at 1024x1024); add "
                                   "ModelSamplingFlux for other sizes."),
                  height=620)
    unet = g.node("UNETLoader", outputs=[("MODEL", "MODEL")], widgets=[FLUX_DEV["name"], "default"],
                  title="FLUX.1-dev", models=[FLUX_DEV])
    dclip = g.node("DualCLIPLoader", outputs=[("CLIP", "CLIP")],
                   widgets=[CLIP_L["name"], T5XXL["name"], "flux", "default"], title="Flux text encoders",
                   models=[CLIP_L, T5XXL])
    vae = g.node("VAELoader", outputs=[("VAE", "VAE")], widgets=[FLUX_AE["name"]], title="Flux VAE",
                 models=[FLUX_AE])
    img, sc, enc = _flow_photo_in(g, vae, 0, CAT)
    src = text(g, dclip, FLUX_SOURCE, "Source caption (describes the photo)", slot=0)
    tgt = text(g, dclip, FLUX_TARGET, "Target caption (the edit)", slot=0)

    def guidance(cond, value, title):
        n = g.node("FluxGuidance", inputs=[("conditioning", "CONDITIONING")],
                   outputs=[("CONDITIONING", "CONDITIONING")], widgets=[value], title=title)
        g.link(cond, 0, n, "conditioning")
        return n

    gsrc = guidance(src, 1.5, "Source guidance 1.5")
    gtgt = guidance(tgt, 5.5, "Target guidance 5.5")
    zero = g.node("ConditioningZeroOut", inputs=[("conditioning", "CONDITIONING")],
                  outputs=[("CONDITIONING", "CONDITIONING")], title="Negative (unused at CFG 1)")
    g.link(src, 0, zero, "conditioning")
    sched = _scheduler(g, unet, "simple", 28)
    guider = g.node("PhotoOps_FlowEditGuider",
                    inputs=[("model", "MODEL"), ("source_positive", "CONDITIONING"),
                            ("source_negative", "CONDITIONING"), ("target_positive", "CONDITIONING"),
                            ("target_negative", "CONDITIONING")],
                    outputs=[("GUIDER", "GUIDER")], widgets=[1.0, 1.0], title="FlowEdit Guider (CFG 1 / 1)")
    g.link(unet, 0, guider, "model")
    g.link(gsrc, 0, guider, "source_positive")
    g.link(zero, 0, guider, "source_negative")
    g.link(gtgt, 0, guider, "target_positive")
    g.link(zero, 0, guider, "target_negative")
    fes = g.node("PhotoOps_FlowEditSampler", outputs=[("SAMPLER", "SAMPLER")], widgets=[24, 0, 1, 10, "fixed"],
                 title="FlowEdit Sampler (n_max 24 of 28)")
    noise = g.node("DisableNoise", outputs=[("NOISE", "NOISE")])
    sca = _sca(g, noise, guider, fes, sched, enc, 0)
    dec = decode(g, sca, vae, vae_slot=0)
    save = save_image(g, dec, "photoops_flux_flowedit", "Edited")
    g.layout(note, [("1. Models, photo and captions", [[unet, dclip, vae], [img, sc, enc], [src, tgt],
                                                       [gsrc, gtgt, zero]]),
                    ("2. FlowEdit", [[sched, guider, fes, noise], [sca, dec], [save]])])
    return g.to_json()


WORKFLOWS = {"attention_mask.json": attention_mask, "inversion_reconstruct.json": inversion_reconstruct,
             "inversion_ddpm_edit.json": inversion_ddpm_edit, "inversion_eta_edit.json": inversion_eta_edit,
             "ledits_edit.json": ledits_edit, "ledits_pp_edit.json": ledits_pp_edit,
             "concept_learn.json": concept_learn,
             # all files sit directly in workflows/: ComfyUI's template browser lists only workflows/*.json.
             # pops_ipadapter_sdxl needs ComfyUI_IPAdapter_plus; the tests route it by the rule in
             # tests/comfy_harness/third_party.py (tests/test_comfy_ipadapter.py runs it).
             "pops_texturing_sdxl.json": pops_texturing_sdxl, "pops_chain_sdxl.json": pops_chain_sdxl,
             "pops_ipadapter_sdxl.json": pops_ipadapter_sdxl,
             "instructbrush_learn_apply.json": instructbrush_learn_apply,
             # SD3.5 / Flux (issue 19): tests/test_comfy_flow_workflows.py runs them (tiny flow fixtures)
             "sd35_inversion_edit.json": sd35_inversion_edit, "flux_flowedit.json": flux_flowedit}


def main():
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    stale = {p.name for p in out.glob("*.json")} - set(WORKFLOWS)
    for name in sorted(stale):
        (out / name).unlink()
        print("removed", out / name)
    for name, build in WORKFLOWS.items():
        (out / name).write_text(json.dumps(build(), indent=1) + "\n")
        print("wrote", out / name)


if __name__ == "__main__":
    main()
