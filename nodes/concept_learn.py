"""Concept Learn: concept tokens + masks from a few photos, saved as standard embeddings (issue 7).

Runs the EM kernel (``kernels/concept_learn.py``) on the ComfyUI model: the text side and the
graph-keeping denoiser live in ``comfy/concepts.py`` and ``comfy/training.py``. Each concept becomes
``<output>/embeddings/<name>.safetensors`` with one ``emb_params`` tensor ``[m, d]`` (SD1.x /
SD2.x, spec §8.2) or, for SDXL, ``clip_l [m, 768]`` + ``clip_g [m, 1280]`` (the keys ComfyUI's
SDXL tokenizers read; one concept vector is both rows, trained jointly through both encoders,
the pooled clip_g output and SDXL's size conditioning). That folder is registered as an
embeddings folder (as ComfyUI registers ``output/loras`` for its trainer), so the file is usable
at once as ``embedding:<name>`` in any prompt (ComfyUI reads embedding files at every
tokenisation); copy it to ``models/embeddings`` or another UI's folder to share it. (The spec
says "the first embeddings folder"; we write under the output directory like every other
PhotoOps save node and ComfyUI's own trainer [D].)
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..kernels import concept_learn as kcl
from ..kernels.attention import AttentionHooks
from ..kernels.files import content_hash, read_safetensors, save_safetensors_atomic
from .checks import first_error, given, refuse_flow
from .comfy.attention import attach_attention_hooks
from .comfy.concepts import ComfyConceptText, read_concept_embedding, save_concept_embedding
from .comfy.files import embedding_files, embedding_path, embeddings_dir, find_embedding
from .comfy.models import context_width, ensure_supported, fingerprint, normal_weight_copies
from .comfy.sampling import interrupt_check, progress_bar, progress_text
from .comfy.training import ComfyGradDenoiser, encode_images_for_training
from .comfy.training import gradient_checkpointing as checkpointed_blocks

CHECKPOINT_SUBDIR = "conceptlearn"
METHOD = "conceptlearn-em"
PALETTE = torch.tensor([[0.95, 0.25, 0.2],  # cpu: preview colours; previews are made on the CPU [0.2, 0.55, 0.95], [0.25, 0.85, 0.3], [0.95, 0.8, 0.15],
                        [0.75, 0.3, 0.9], [0.2, 0.85, 0.85], [0.95, 0.5, 0.1], [0.6, 0.6, 0.6]])


def _refuse_flow(model) -> None:
    """Spec ``rectified-flow.md`` §5: not on Flux (its DiT reads T5 tokens only; a CLIP embedding feeds only the
    pooled vector), nor, in this version, on SD3 / SD3.5 (the training reads UNet cross-attention maps)."""
    refuse_flow(model, "Concept Learn (textual inversion with Break-A-Scene attention masks) is defined on UNet "
                       "cross-attention (SD1.x / SD2.x / SDXL)",
                "on Flux a learned CLIP embedding would barely act (the transformer reads only T5 tokens; CLIP-L "
                "feeds only the pooled vector), and on SD3 / SD3.5 it is not supported in this version. Learn the "
                "concept on an SD1.x / SDXL model, or train a LoRA for this model with a LoRA trainer")


def _split(text: str) -> list:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def prepare_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """``[N, H, W, C]`` -> ``[N, R, R, 3]``: short side resized to R (bilinear), centre crop (spec §7.1)."""
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("Concept Learn needs at least one image (IMAGE batch of 1-N photos)")
    x = images[..., :3].movedim(-1, 1).float()
    h, w = x.shape[-2:]
    s = resolution / min(h, w)
    nh, nw = max(resolution, round(h * s)), max(resolution, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[:, :, top:top + resolution, left:left + resolution].movedim(1, -1).clamp(0, 1)


def prepare_masks(masks: torch.Tensor, n: int, k: int, src_hw, resolution: int) -> torch.Tensor:
    """MASK ``[N*K, H, W]`` (image-major) -> ``[N, K, R, R]``, cropped like the images."""
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[0] != n * k:
        raise ValueError(f"init_masks holds {masks.shape[0]} masks, expected images x concepts = {n} x {k} = {n * k} "
                         f"in image-major order (index n*K + k)")
    if tuple(masks.shape[-2:]) != tuple(src_hw):
        raise ValueError(f"init_masks are {masks.shape[-1]}x{masks.shape[-2]}, the images {src_hw[1]}x{src_hw[0]}; "
                         f"give masks of the images' size")
    m = prepare_images(masks.float()[..., None].expand(-1, -1, -1, 3), resolution)[..., 0]
    return m.reshape(n, k, resolution, resolution)


def preview(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Colour overlay of each concept's mask on its image: ``[N, R, R, 3]``."""
    out = images.clone()
    for k in range(masks.shape[1]):
        c = PALETTE[k % len(PALETTE)].view(1, 1, 1, 3)
        m = masks[:, k, :, :, None]
        out = out * (1 - 0.5 * m) + c * 0.5 * m
    return out.clamp(0, 1)


def save_mask_cache(path: str, masks: torch.Tensor, losses: list) -> None:
    """Final masks and losses of a run, so that an unchanged graph does not retrain (next to the checkpoints)."""
    save_safetensors_atomic(path, {"masks": masks.float(),
                                   "loss": torch.tensor(losses, dtype=torch.float32)})  # cpu: written to a file


def load_mask_cache(path: str):
    d, _ = read_safetensors(path)
    return d["masks"], d["loss"].tolist()


class ConceptLearnNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        try:
            files = embedding_files()
        except Exception:  # noqa: BLE001 - folder not configured
            files = []
        return io.Schema(
            node_id="PhotoOps_ConceptLearn",
            display_name="Concept Learn",
            category="PhotoOps/concepts",
            description="Learns one new token per concept (and its mask in every photo) from 1-N photos by EM: "
                        "token steps with a masked diffusion + attention loss, then masks re-estimated from the "
                        "tokens' cross-attention. Saves each concept as a standard embedding file; use it as "
                        "embedding:NAME in any prompt (files in output/embeddings). SD1.x / SD2.x / SDXL models.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.x / SD2.x / SDXL model, eps or v-prediction (cloned; its "
                                                "weights stay frozen)."),
                io.Clip.Input("clip", tooltip="The same checkpoint's CLIP. Its clip-skip setting is used for "
                                              "training; generate with the same setting."),
                io.Vae.Input("vae", tooltip="Encodes the photos once."),
                io.Image.Input("images", tooltip="1-N photos of the concepts (one IMAGE batch). Short side resized "
                                                 "to 'resolution' and centre-cropped."),
                io.String.Input("concept_names", default="cl_concept",
                                tooltip="Comma-separated new names, e.g. 'cl_dog, cl_room'. Become the file names "
                                        "and the prompt handles embedding:cl_dog. Letters, digits, _ . - only; not "
                                        "an existing word."),
                io.String.Input("init_words", default="object",
                                tooltip="Comma-separated, one per concept, e.g. 'dog, room'. Each token starts "
                                        "from this word's embedding, and the first masks come from its attention."),
                io.Int.Input("steps", default=400, min=1, max=10000,
                             tooltip="Token optimisation steps in total (spread over the EM rounds). Paper "
                                     "baseline (Break-A-Scene phase 1): 400."),
                io.Float.Input("learning_rate", default=5e-4, min=1e-6, max=1e-1, step=1e-5,
                               tooltip="AdamW learning rate of the token vectors (default 5e-4)."),
                io.Int.Input("em_rounds", default=4, min=1, max=20,
                             tooltip="Rounds of (token steps, mask re-estimation)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds timesteps, noise, concept subsets and flips; same inputs + seed = "
                                     "same embedding."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training resolution in pixels (512 for SD1.5, 768 for SD2.x-768, 1024 for "
                                     "SDXL)."),
                io.Float.Input("lambda_attn", default=0.01, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Weight of the attention loss (cross-attention of each token vs its mask)."),
                io.Int.Input("vectors_per_token", default=1, min=1, max=8, optional=True,
                             tooltip="Embedding vectors per concept (1 = one word)."),
                io.Boolean.Input("use_crf", default=True, optional=True,
                                 tooltip="Refine masks with a dense CRF on the photo's colours."),
                io.Boolean.Input("unassigned_label", default=True, optional=True,
                                 tooltip="Let pixels belong to no concept. Turn off when the concepts cover the whole "
                                         "photo (e.g. person + room)."),
                io.Int.Input("save_every", default=100, min=0, max=10000, optional=True,
                             tooltip="Write a checkpoint embedding every N steps to output/embeddings/conceptlearn/"
                                     "NAME-STEP (usable as embedding:conceptlearn/NAME-STEP). 0 = never."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace existing embedding files of the same names."),
                io.Mask.Input("init_masks", optional=True,
                              tooltip="Optional start masks, images x concepts in image-major order (index "
                                      "n*K + k), the photos' size. Without them the first masks come from the "
                                      "init words' attention."),
                io.String.Input("presence", default="", optional=True,
                                tooltip="Optional: which concepts each photo shows, e.g. '0: 0,1; 1: 0'. Empty = "
                                        "every concept in every photo."),
                io.Combo.Input("resume_from", options=["none"] + files, default="none", optional=True,
                               tooltip="Continue from a checkpoint embedding of the first concept (e.g. "
                                       "conceptlearn/cl_dog-interrupted-120); the other concepts' files of the "
                                       "same step are found next to it."),
                io.Combo.Input("loss_region", options=["union", "not_others"], default="union", optional=True,
                               tooltip="Where the diffusion loss counts. union: only inside the prompt's concepts' "
                                       "masks (the paper's Break-A-Scene loss). not_others: everywhere except the "
                                       "other concepts' masks, so the token is also judged on what it must NOT "
                                       "draw (better shapes on our toy test; = textual inversion for 1 concept)."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute each UNet block in the backward pass instead of keeping its "
                                         "activations: less memory in the token steps (for SDXL at 1024 px), more "
                                         "compute. Same result."),
            ],
            outputs=[
                io.Clip.Output(display_name="clip", tooltip="The input CLIP, unchanged; the embeddings are in the "
                                                            "embeddings folder."),
                io.Mask.Output(display_name="masks", tooltip="Final binary masks, images x concepts (image-major), "
                                                             "at the training crop."),
                io.Image.Output(display_name="mask_preview", tooltip="The masks in colour over the photos."),
                io.String.Output(display_name="prompt_hint", tooltip="A prompt using the learned embeddings."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step (plot with Plot Loss Graph)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, concept_names=None, init_words=None, resolution=None, steps=None, learning_rate=None,
                        em_rounds=None, vectors_per_token=None, loss_region=None):
        def names():
            if given(concept_names, init_words):
                kcl.validate_names(_split(concept_names), _split(init_words))

        def res():
            if resolution is not None and resolution % 8:
                raise ValueError(f"resolution must be a multiple of 8, got {resolution}")

        def config():
            given_ = {k: v for k, v in (("steps", steps), ("lr", learning_rate), ("em_rounds", em_rounds),
                                        ("vectors_per_token", vectors_per_token), ("loss_region", loss_region))
                      if v is not None}
            kcl.ConceptConfig(**given_).validate()

        return first_error(names, res, config)

    @classmethod
    def execute(cls, model, clip, vae, images, concept_names, init_words, steps, learning_rate, em_rounds, seed,
                resolution, lambda_attn=0.01, vectors_per_token=1, use_crf=True, unassigned_label=True,
                save_every=100, overwrite=False, init_masks=None, presence="", resume_from="none",
                loss_region="union", gradient_checkpointing=False) -> io.NodeOutput:
        names, words = _split(concept_names), _split(init_words)
        _refuse_flow(model)
        ensure_supported(model)
        text = ComfyConceptText(clip)
        ctx = context_width(model)
        if ctx != text.width:
            raise ValueError(f"the CLIP gives {text.width}-wide conditioning but the model reads {ctx}: connect the "
                             f"checkpoint's own CLIP (SD1.x 768, SD2.x 1024, SDXL 768 + 1280)")
        kcl.validate_names(names, words, text)
        for w in words:
            text.init_vector(w)
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        with torch.inference_mode(False), torch.enable_grad():
            imgs = prepare_images(images.clone() if images is not None else None, resolution)
            N, K = imgs.shape[0], len(names)
            P = kcl.parse_presence(presence, N, K)
            masks0 = None
            if init_masks is not None:
                masks0 = prepare_masks(init_masks.clone(), N, K, images.shape[1:3], resolution)
            cfg = kcl.ConceptConfig(steps=int(steps), em_rounds=int(em_rounds), lr=float(learning_rate),
                                    lambda_attn=float(lambda_attn), vectors_per_token=int(vectors_per_token),
                                    use_crf=bool(use_crf), unassigned=bool(unassigned_label), seed=int(seed),
                                    save_every=int(save_every), loss_region=str(loss_region))
            cfg.validate()
            edir = embeddings_dir()
            final = {n: os.path.join(edir, f"{n}.safetensors") for n in names}
            fp = fingerprint(model)
            key = content_hash(fp, text.width, imgs, masks0 if masks0 is not None else 0, P, names, words,
                          vars(cfg), resume_from)
            cache_file = os.path.join(edir, CHECKPOINT_SUBDIR, f".cache-{key}.safetensors")
            cached = cls._cached(final, key, cache_file)
            if cached is not None:
                masks, losses = cached
                logging.info("Concept Learn: unchanged inputs, reusing %s", ", ".join(final.values()))
                return cls._outputs(clip, imgs, masks, names, losses)
            for n, path in final.items():
                other = find_embedding(n)
                if other is not None and os.path.abspath(other) != os.path.abspath(path):
                    raise ValueError(f"an embedding named {n!r} already exists at {other}; embedding:{n} would be "
                                     f"ambiguous, so choose another concept name")
                if os.path.exists(path) and not overwrite:
                    raise ValueError(f"the embedding {path} already exists; choose another concept name or turn on "
                                     f"'overwrite'")
            init_vectors, start_step = cls._resume(resume_from, names, text.width, int(vectors_per_token))

            patched_hooks = AttentionHooks()
            patched = attach_attention_hooks(model, patched_hooks)
            den = ComfyGradDenoiser(patched)
            latents = encode_images_for_training(model, vae, imgs)
            den.load()
            clip.load_model()
            if str(den.device) == "cpu":
                logging.warning("Concept Learn is running on the CPU: expect minutes per step at 512 px")
            small = F.interpolate(imgs.movedim(-1, 1), size=latents.shape[-2:], mode="area").clamp(0, 1)
            total = int(steps)
            pbar = progress_bar(total)
            pbar.update_absolute(start_step, total)
            hidden = getattr(cls, "hidden", None)
            node_id = getattr(hidden, "unique_id", None) if hidden is not None else None
            meta_base = {"method": METHOD, "steps": total, "em_rounds": int(em_rounds), "run": key,
                         "base_model": fp["family"], "width": text.width}

            def progress(step, tot, loss):
                pbar.update_absolute(step, tot)
                progress_text(node_id, f"step {step}/{tot}  loss {loss:.5f}")
                if step % 25 == 0 or step == tot:
                    logging.info("Concept Learn step %d/%d loss %.5f", step, tot, loss)

            def checkpoint(step, vectors, reason):
                tag = f"{step}" if reason == "periodic" else f"interrupted-{step}"
                for k, n in enumerate(names):
                    path = os.path.join(edir, CHECKPOINT_SUBDIR, f"{n}-{tag}.safetensors")
                    save_concept_embedding(path, text.file_tensors(vectors[k]),
                                              {**meta_base, "concept": n, "init_word": words[k], "step": step,
                                               "checkpoint": reason})
                if reason != "periodic":
                    logging.warning("Concept Learn stopped at step %d; checkpoint %s", step,
                                    os.path.join(edir, CHECKPOINT_SUBDIR, f"{names[0]}-{tag}.safetensors"))

            with normal_weight_copies(patched.model.diffusion_model, *text.subs), \
                    checkpointed_blocks(patched.model.diffusion_model, bool(gradient_checkpointing)):
                res = kcl.learn_concepts(den, text, patched_hooks, latents.to(den.device), small.to(den.device),
                                         words, cfg, init_masks=masks0, presence=P, init_vectors=init_vectors,
                                         start_step=start_step, progress=progress, interrupt=interrupt_check,
                                         checkpoint=checkpoint)
            pbar.update_absolute(total, total)
            for k, n in enumerate(names):
                save_concept_embedding(final[n], text.file_tensors(res.vectors[k]),
                                          {**meta_base, "concept": n, "init_word": words[k],
                                           "step": res.steps_done, "checkpoint": "final"})
            masks = F.interpolate(res.masks.float(), size=(resolution, resolution), mode="nearest")
            save_mask_cache(cache_file, masks, res.losses)
            return cls._outputs(clip, imgs, masks, names, res.losses)

    @classmethod
    def _outputs(cls, clip, imgs, masks, names, losses):
        N, K = masks.shape[:2]
        hint = "a photo of " + " and ".join(f"embedding:{n}" for n in names)
        return io.NodeOutput(clip, masks.reshape(N * K, *masks.shape[-2:]).float().cpu(),
                             preview(imgs.cpu(), masks.cpu()), hint, {"loss": [float(v) for v in losses]})

    @staticmethod
    def _cached(final: dict, key: str, cache_file: str):
        if not os.path.exists(cache_file):
            return None
        for path in final.values():
            if not os.path.exists(path):
                return None
            _, meta = read_concept_embedding(path)
            if meta.get("run") != key or meta.get("checkpoint") != "final":
                return None
        return load_mask_cache(cache_file)

    @staticmethod
    def _resume(resume_from, names, width, m):
        if not resume_from or resume_from == "none":
            return None, 0
        first = embedding_path(resume_from)
        v0, meta = read_concept_embedding(first)
        concept, step = meta.get("concept"), meta.get("step")
        if concept is None or step is None or meta.get("method") != METHOD:
            raise ValueError(f"{resume_from} is not a Concept Learn checkpoint (no concept/step metadata)")
        base = os.path.basename(first)
        vecs = []
        for n in names:
            path = os.path.join(os.path.dirname(first), base.replace(concept, n, 1))
            if not os.path.exists(path):
                raise ValueError(f"resuming from {resume_from}: no checkpoint for concept {n!r} at {path}")
            v, _ = read_concept_embedding(path)
            if v.shape[-1] != width:
                raise ValueError(f"{path} holds {v.shape[-1]}-wide vectors; this CLIP takes {width}")
            if v.shape[0] != m:
                raise ValueError(f"{path} holds {v.shape[0]} vectors per token; vectors_per_token is {m}")
            vecs.append(v)
        return torch.stack(vecs), int(step)


try:      # register <output>/embeddings before any checkpoint (and its CLIP) is loaded
    embeddings_dir(create=False)
except Exception:  # noqa: BLE001 - folder_paths not ready (import outside ComfyUI)
    pass

NODES = [ConceptLearnNode]
