"""The one module that touches ComfyUI internals (``comfy.*``).

Everything PhotoOps needs from ComfyUI's private API goes through here, so an upstream
change breaks one file:

* :func:`ensure_supported` — SD1.x / SD2.x / SDXL-style UNets with discrete eps or v
  model sampling; anything else (Flux, SD3, Cascade, EDM, flow) is refused clearly.
* :func:`attach_attention_hooks` — clone the ModelPatcher and install an ``attn2``
  replace on every cross-attention block that dispatches to a kernels
  :class:`~..kernels.attention.AttentionHooks`.  An existing replace on the same block
  (another pack's) is wrapped and still computes the layer's output.
* :func:`tokenize_word` — word -> key positions with the CLIP object's own tokenizer.
* :class:`ComfyDenoiser` — the kernels Denoiser view over ``calc_cond_batch``.
* progress / interrupt helpers.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
from comfy.ldm.modules.attention import optimized_attention
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..kernels.attention import AttentionHooks
from ..kernels.protocol import CallInfo, LayerInfo, UnsupportedModelError, step_of_sigma
from ..kernels.schedule import VPSchedule
from ..kernels.tokens import find_word_positions

HOOK_KEY = "photoops_attention"
_PLACES = {"input": "down", "middle": "mid", "output": "up"}


# -- model family -----------------------------------------------------------------------
def model_family(model) -> str:
    return type(model.model).__name__


def ensure_supported(model) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is an SD-style UNet we handle."""
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, UNetModel):
        raise UnsupportedModelError(
            f"PhotoOps supports SD1.x, SD2.x and SDXL UNet models; this model is {model_family(model)} "
            f"({type(dm).__name__}), which has no UNet cross-attention to hook")
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or isinstance(ms, comfy.model_sampling.EDM) \
            or not isinstance(ms, comfy.model_sampling.EPS):
        raise UnsupportedModelError(
            f"PhotoOps supports discrete eps- and v-prediction sampling; this model uses "
            f"{type(ms).__name__} ({[c.__name__ for c in type(ms).__mro__[1:3]]})")


def prediction_type(model) -> str:
    ms = model.get_model_object("model_sampling")
    return "v_prediction" if isinstance(ms, comfy.model_sampling.V_PREDICTION) else "epsilon"


def vp_schedule(model) -> VPSchedule:
    ms = model.get_model_object("model_sampling")
    return VPSchedule(1.0 / (1.0 + ms.sigmas.double() ** 2))


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def check_latent(model, latent: torch.Tensor) -> None:
    """Clear error for a LATENT that does not fit the model (channels, size)."""
    c = latent_channels(model)
    if latent.ndim != 4 or latent.shape[1] != c:
        raise ValueError(f"the latent has shape {tuple(latent.shape)}, but this model ({model_family(model)}) "
                         f"expects [batch, {c}, height, width]; encode the image with this model's VAE")
    if latent.shape[-1] < 2 or latent.shape[-2] < 2:
        raise ValueError(f"the latent {tuple(latent.shape[-2:])} is too small for this model")


# -- attention hooks --------------------------------------------------------------------
def cross_attention_layers(model) -> list:
    """LayerInfo for each cross-attention transformer block, in forward order."""
    from comfy.ldm.modules.attention import SpatialTransformer

    ensure_supported(model)
    dm = model.get_model_object("diffusion_model")
    keys = []
    for name, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for i, blk in enumerate(blocks):
            for mod in blk:
                if isinstance(mod, SpatialTransformer):
                    for j, tb in enumerate(mod.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            keys.append((name, 0 if name == "middle" else i, j))
    if not keys:
        raise UnsupportedModelError("the model's UNet has no cross-attention layers")
    return [LayerInfo(key=k, place=_PLACES[k[0]], order=n) for n, k in enumerate(keys)]


def _call_info(q, extra_options) -> CallInfo:
    chunks = list(extra_options.get("cond_or_uncond") or [0])
    sig = extra_options.get("sigmas")
    sigma = float(sig.flatten()[0]) if isinstance(sig, torch.Tensor) else float(sig or 0.0)
    step, total = step_of_sigma(sigma, extra_options.get("sample_sigmas"))
    shape = extra_options.get("original_shape")
    return CallInfo(sigma=sigma, chunks=chunks, rows_per_chunk=q.shape[0] // max(len(chunks), 1),
                    latent_hw=tuple(shape[-2:]), step=step, total_steps=total)


def _make_replace(hooks: AttentionHooks, layer: LayerInfo, previous):
    def attn2_replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]

        def attend(q, k, v):
            if previous is not None:
                return previous(q, k, v, extra_options)
            return optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                       transformer_options=extra_options)

        if not len(hooks):
            return attend(q, k, v)
        return hooks(q, k, v, heads, layer, _call_info(q, extra_options), attend)

    attn2_replace.photoops_layer = layer
    return attn2_replace


def attach_attention_hooks(model, hooks: AttentionHooks, on_run_start=None):
    """A clone of ``model`` whose cross-attention layers dispatch to ``hooks``.

    ``on_run_start()`` is called when a sampling run with the clone starts (ComfyUI's
    ON_PRE_RUN callback), e.g. to reset recorders.  The input model is not touched.
    """
    layers = cross_attention_layers(model)
    m = model.clone()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer in layers:
        key = layer.key
        previous = existing.get(key, existing.get(key[:2]))
        m.set_model_attn2_replace(_make_replace(hooks, layer, previous), key[0], key[1], key[2])
    if on_run_start is not None:
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, HOOK_KEY,
                                lambda patcher: on_run_start())
    return m


# -- tokens -----------------------------------------------------------------------------


def tokenize_word(clip, prompt: str, word: str) -> dict:
    """Key positions of ``word`` in ``prompt`` as the CLIP object tokenizes it.

    Returns ``{"positions", "prompt_len", "tokens"}``; ``prompt_len`` is the length of
    the prompt's conditioning sequence (77 per chunk).  For SDXL the ``l`` and ``g``
    tokenizers give the same positions; ``l`` (or the only one) is used.
    """
    if not word or not word.strip():
        raise ValueError("the word to capture is empty")
    ptoks = clip.tokenize(prompt)
    key = "l" if "l" in ptoks else next(iter(ptoks))
    query, tok, special = _real_tokens(clip, word.strip())
    positions = find_word_positions(ptoks[key], query, decode=_decoder(tok), special=tuple(special), word=word)
    chunk_len = len(ptoks[key][0])
    return {"positions": positions, "prompt_len": chunk_len * len(ptoks[key]), "tokens": ptoks[key]}


def _real_tokens(clip, text: str):
    """``(tokens, tokenizer, special ids)``: the tokens of ``text`` without BOS/EOS/padding."""
    toks = clip.tokenize(text)
    key = "l" if "l" in toks else next(iter(toks))
    tok = _sub_tokenizer(clip, key)
    special = {t for t in (getattr(tok, "start_token", None), getattr(tok, "end_token", None),
                           getattr(tok, "pad_token", None)) if t is not None}
    real = [item[0] for chunk in toks[key] for item in chunk
            if isinstance(item[0], torch.Tensor) or item[0] not in special]
    return real, tok, special


def _sub_tokenizer(clip, key):
    t = clip.tokenizer
    for attr in ("clip_" + key, key, getattr(t, "clip", None)):
        if isinstance(attr, str) and hasattr(t, attr):
            return getattr(t, attr)
    return t


def _decoder(tok):
    inv = None
    inner = getattr(tok, "tokenizer", None)
    if inner is not None and hasattr(inner, "get_vocab"):
        inv = {v: k for k, v in inner.get_vocab().items()}
    return (lambda i: inv.get(i, str(i)).replace("</w>", "")) if inv else str


# -- denoiser view ----------------------------------------------------------------------
class ComfyDenoiser:
    """Denoiser view inside a ComfyUI sampling run (conds already processed)."""

    def __init__(self, inner_model, conds: Sequence, model_options: dict):
        self.inner_model, self.conds, self.model_options = inner_model, list(conds), model_options
        ms = inner_model.model_sampling
        self.schedule = VPSchedule(1.0 / (1.0 + ms.sigmas.double() ** 2))

    def predict_x0(self, x, sigma, conds: Optional[Sequence[int]] = None) -> list:
        sel = [self.conds[i] for i in (conds if conds is not None else range(len(self.conds)))]
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        return comfy.samplers.calc_cond_batch(self.inner_model, sel, x, s, self.model_options)


class ProbeGuider(comfy.samplers.CFGGuider):
    """A guider over N conditionings whose sampler function gets a :class:`ComfyDenoiser`.

    ``run(fn, latent, sigmas)`` prepares the model exactly as a normal sampling run does
    (LoRA patches, hooks, device placement), then calls ``fn(denoiser, x, sigmas)``.
    """

    def __init__(self, model_patcher, conditionings: Sequence):
        super().__init__(model_patcher)
        self.inner_set_conds({f"c{i}": c for i, c in enumerate(conditionings)})
        self.n = len(conditionings)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["c0"]], x, timestep, model_options)[0]

    def run(self, fn, latent: torch.Tensor, sigmas: torch.Tensor, seed: int = 0):
        out = {}
        guider = self

        def sampler_fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
            den = ComfyDenoiser(guider.inner_model, [guider.conds[f"c{i}"] for i in range(guider.n)],
                                extra_args["model_options"])
            out["result"] = fn(den, x, sigmas)
            return x

        sampler = comfy.samplers.KSAMPLER(sampler_fn)
        self.sample(torch.zeros_like(latent), latent, sampler, sigmas, disable_pbar=True, seed=seed)
        return out["result"]


# -- progress and interruption -----------------------------------------------------------
def progress_bar(total: int):
    return comfy.utils.ProgressBar(total)


# -- running our own sampler functions inside ComfyUI's sampling machinery ------------------
def run_with_guider(model, positive, negative, cfg: float, latent: torch.Tensor, sigmas: torch.Tensor, fn,
                    seed: int = 0):
    """Run ``fn(denoise, x, sigmas)`` as the sampler function of a core CFGGuider.

    ComfyUI prepares everything as for a normal run (conds, LoRA and hook patches, device
    placement, ``process_latent_in``); ``x`` is the k-space latent (``noise`` is zero, so
    ``x = latent``) and ``denoise(x, sigma)`` the CFG-guided x0 prediction.  ``fn`` returns
    ``(result, x_out)``; returns ``(result, latent_out)`` with ``process_latent_out`` applied.
    """
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    box = {}

    def sampler_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}

        def denoise(xx, s):
            return model_k(xx, s, **extra_args)

        box["result"], x_out = fn(denoise, x, sigmas)
        return x_out

    out = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(sampler_fn), sigmas,
                        disable_pbar=True, seed=seed)
    return box["result"], out


def ksampler(fn, **extra_options):
    """A SAMPLER object for core SamplerCustomAdvanced over a k-diffusion function."""
    return comfy.samplers.KSAMPLER(fn, extra_options=extra_options)


def fingerprint(model) -> dict:
    """Family + a hash of weights LoRAs leave alone (conv_in and the output conv).

    Taken from the ModelPatcher's backup when those weights are currently patched, so a
    LoRA loaded on top does not change it.
    """
    import hashlib

    base = model.model if hasattr(model, "model") else model
    dm = base.diffusion_model
    h = hashlib.sha1()
    backup = getattr(model, "backup", {}) or {}
    for key, w in (("diffusion_model.input_blocks.0.0.weight", dm.input_blocks[0][0].weight),
                   ("diffusion_model.out.2.weight", dm.out[2].weight)):
        if key in backup:
            w = backup[key].weight
        t = w.detach().float().flatten()
        h.update(str(tuple(w.shape)).encode())
        h.update(t[:: max(1, t.numel() // 4096)].cpu().numpy().tobytes())
    fp = {"family": type(base).__name__, "weights": h.hexdigest()[:16]}
    if hasattr(model, "get_model_object"):
        fp["prediction"] = prediction_type(model)
    return fp


def interrupt_check():
    """For kernels' ``interrupt`` hooks: raises ComfyUI's interrupt exception."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def register_folder(name: str, subdir: str) -> str:
    """Register ``models/<subdir>`` and ``output/<subdir>`` as model folder ``name`` (safetensors).

    Returns the output-side folder, where our save nodes write (like Save Image does);
    loaders list both.  Users can add more roots in extra_model_paths.yaml under ``name``.
    """
    import os

    import folder_paths

    out = os.path.join(folder_paths.get_output_directory(), subdir)
    paths = [os.path.join(folder_paths.models_dir, subdir), out]
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = (paths, {".safetensors"})
    else:
        have = folder_paths.folder_names_and_paths[name][0]
        have.extend(p for p in paths if p not in have)
    return out


def folder_files(name: str) -> list:
    import folder_paths

    return folder_paths.get_filename_list(name)


def folder_file_path(name: str, filename: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise(name, filename)


def patcher_of(model_k):
    """The ModelPatcher behind a KSAMPLER function's ``model`` (via the guider), or None."""
    guider = getattr(model_k, "inner_model", None)
    return getattr(guider, "model_patcher", None)


class CombineGuider(comfy.samplers.CFGGuider):
    """A GUIDER over several named conditionings, evaluated in ONE batched model call per step
    (as core PerpNegGuider does) and combined by a kernel function.

    ``combine(x, sigma, outs, step)`` gets the denoised predictions in ``order`` and the
    0-based step counted from the first step this run evaluates (so skipped steps of an
    inversion replay do not count toward warm-ups); it returns the guided denoised.
    Pre- and post-CFG hooks of other nodes are replayed around it.  ``on_run_start(sigmas)``
    is called when a sampling run starts (reset momentum, validate step counts).
    """

    def __init__(self, model_patcher, conds: dict, order: list, combine, cfg: float, on_run_start=None):
        super().__init__(model_patcher)
        self.inner_set_conds(conds)
        self.order, self.combine, self.cfg = list(order), combine, float(cfg)
        self.on_run_start = on_run_start
        self._first = None

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self._first = None
        if self.on_run_start is not None:
            self.on_run_start(sigmas)
        return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        conds = [self.conds.get(k) for k in self.order]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        step, _ = step_of_sigma(float(timestep.flatten()[0]),
                                model_options.get("transformer_options", {}).get("sample_sigmas"))
        step = 0 if step is None else step
        if self._first is None:
            self._first = step
        result = self.combine(x, timestep, out, step - self._first)
        for fn in model_options.get("sampler_post_cfg_function", []):
            result = fn({"denoised": result, "cond": conds[1], "uncond": conds[0], "model": self.inner_model,
                         "uncond_denoised": out[0], "cond_denoised": out[1], "sigma": timestep,
                         "model_options": model_options, "input": x, "cond_scale": self.cfg})
        return result


def count_prompt_tokens(clip, text: str) -> int:
    """Number of real tokens (no BOS/EOS/padding) the CLIP tokenizer makes of ``text``."""
    return len(_real_tokens(clip, text)[0])


def encode_text(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


# ---- ConceptLearn (issue 7) -------------------------------------------------------------
# Differentiable text encoding with spliced concept rows, a graph-keeping denoiser over the
# patched ModelPatcher, VAE encoding into model space, and standard embedding files.
CONCEPT_EMBED_KEY = "emb_params"


class ConceptClipPart:
    """One text encoder of a CLIP object: tokens key, model, tokenizer, width, file key."""

    def __init__(self, key: str, model, tokenizer, file_key: str):
        self.key, self.model, self.tok, self.file_key = key, model, tokenizer, file_key
        self.width = int(model.transformer.get_input_embeddings().weight.shape[1])


def concept_clip_parts(clip) -> list:
    """The text encoders a concept vector is spliced into, as :class:`ConceptClipPart` s.

    SD1.x / SD2.x: one encoder, file key ``emb_params`` (spec §8.2).  SDXL: ``clip_l`` and
    ``clip_g`` (ComfyUI's SDXL tokenizers look these keys up in an embedding file, as A1111 and
    diffusers' SDXL loaders do); one concept vector is the two rows side by side, ``[768 + 1280]``.
    Everything else (SDXL refiner's lone clip_g, T5 families) is refused.
    """
    csm = clip.cond_stage_model
    if hasattr(csm, "clip_l") and hasattr(csm, "clip_g") and hasattr(csm.clip_l, "transformer") \
            and hasattr(csm.clip_g, "transformer") and len([n for n, _ in csm.named_children()]) == 2:
        return [ConceptClipPart("l", csm.clip_l, _sub_tokenizer(clip, "l"), "clip_l"),
                ConceptClipPart("g", csm.clip_g, _sub_tokenizer(clip, "g"), "clip_g")]
    name = getattr(csm, "clip", None)
    sub = getattr(csm, name, None) if isinstance(name, str) else None
    if sub is None or not hasattr(sub, "transformer") or hasattr(csm, "clip_g") or name == "clip_g":
        raise UnsupportedModelError(
            f"ConceptLearn trains SD1.x / SD2.x (one CLIP text encoder) and SDXL (clip_l + clip_g) embeddings; "
            f"this CLIP is {type(csm).__name__}")
    key = name.replace("clip_", "")
    return [ConceptClipPart(key, sub, _sub_tokenizer(clip, key), CONCEPT_EMBED_KEY)]


class ComfyConceptText:
    """:class:`~..kernels.concept_learn.ConceptText` over a ComfyUI CLIP object.

    A prompt is assembled, per text encoder, as one 77-item chunk ``BOS, tokens..., EOS, PAD...``
    (each encoder's own special tokens: SDXL's clip_g pads with 0); each concept slot is ``m``
    items holding (that encoder's slice of) the learnable rows, which ComfyUI's
    ``process_tokens`` splices into the input embeddings with ``torch.cat`` (differentiable).
    The text encoders' weights and embedding tables are never touched; the CLIP object's
    clip-skip setting is respected (``encode_from_tokens``).

    ``encode`` returns the cross-attention context ``[1, 77, d_ctx]`` for one-encoder CLIPs and,
    for SDXL, ``{"c_crossattn": [1, 77, 2048], "pooled_output": [1, 1280]}`` (the pooled clip_g
    output feeds SDXL's ADM vector; :class:`ComfyGradDenoiser` builds it).
    """

    def __init__(self, clip):
        self.clip = clip
        self.parts = concept_clip_parts(clip)
        self.subs = [p.model for p in self.parts]
        self.widths = [p.width for p in self.parts]
        self.width = sum(self.widths)
        self.pooled = len(self.parts) > 1
        self.max_length = int(getattr(self.parts[0].tok, "max_length", 77))

    def _ids(self, text: str) -> list:
        if not text.strip():
            return []
        real, _, _ = _real_tokens(self.clip, text)
        if any(isinstance(t, torch.Tensor) for t in real):
            raise ValueError(f"the text {text!r} contains an embedding; ConceptLearn prompts take plain words")
        return [int(t) for t in real]

    def init_vector(self, word: str) -> torch.Tensor:
        ids = self._ids(word)
        if not ids:
            raise ValueError(f"the init word {word!r} tokenizes to nothing")
        rows = [p.model.transformer.get_input_embeddings().weight[ids[0]] for p in self.parts]
        return torch.cat([r.detach().float().cpu() for r in rows]).clone()

    def is_single_token(self, name: str) -> bool:
        return len(self._ids(name)) == 1

    def split(self, vectors: torch.Tensor) -> list:
        """``[..., width]`` -> one ``[..., width_i]`` slice per text encoder."""
        if vectors.shape[-1] != self.width:
            raise ValueError(f"concept vectors are {vectors.shape[-1]} wide; this CLIP takes {self.width} "
                             f"({' + '.join(str(w) for w in self.widths)})")
        return list(torch.split(vectors, self.widths, dim=-1))

    def file_tensors(self, vectors: torch.Tensor) -> dict:
        """The embedding file's tensors for one concept's ``[m, width]`` vectors."""
        return {p.file_key: v.detach().float().cpu().contiguous() for p, v in zip(self.parts, self.split(vectors))}

    def encode(self, parts, vectors: torch.Tensor):
        m = vectors.shape[1]
        slices = self.split(vectors)
        ids = [self._ids(p) if isinstance(p, str) else None for p in parts]
        tokens, positions = {}, {}
        for part, vec in zip(self.parts, slices):
            tok = part.tok
            start, end = getattr(tok, "start_token", None), tok.end_token
            pad = getattr(tok, "pad_token", end)
            items, pos = ([] if start is None else [(start, 1.0)]), {}
            for p, p_ids in zip(parts, ids):
                if p_ids is not None:
                    items += [(t, 1.0) for t in p_ids]
                else:
                    k = int(p)
                    pos.setdefault(k, [])
                    for i in range(m):
                        pos[k].append(len(items))
                        items.append((vec[k, i], 1.0))
            if len(items) + 1 > self.max_length:
                raise ValueError(f"the prompt needs {len(items) + 1} tokens; one chunk holds {self.max_length}")
            items.append((end, 1.0))
            items += [(pad, 1.0)] * (self.max_length - len(items))
            tokens[part.key] = [items]
            positions = positions or pos
        with contextlib.ExitStack() as stack:
            for sub in self.subs:
                stack.enter_context(_out_of_place_clip_layers(sub))
            if self.pooled:
                cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
                return {"c_crossattn": cond, "pooled_output": pooled}, positions
            cond = self.clip.encode_from_tokens(tokens)
        return cond, positions


def _clip_layer_forward(layer, x, mask=None, optimized_attention=None):
    """ComfyUI's ``CLIPLayer.forward`` without the in-place residual adds (same math; autograd-safe)."""
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


class _out_of_place_clip_layers:
    """For one encode: give each CLIP layer of ``sub`` an instance-level out-of-place forward.

    ComfyUI's CLIP layers add residuals in place (``x += ...``), which autograd rejects when
    gradients must reach the input embeddings.  Only this model's instances are touched,
    and only until the ``with`` block ends.
    """

    def __init__(self, sub):
        import functools

        from comfy.clip_model import CLIPLayer

        self.layers = [m for m in sub.modules() if isinstance(m, CLIPLayer)]
        self.partial = functools.partial

    def __enter__(self):
        for layer in self.layers:
            layer.forward = self.partial(_clip_layer_forward, layer)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        return False


class ComfyGradDenoiser:
    """:class:`~..kernels.concept_learn.GradDenoiser` over a (hooked) ModelPatcher.

    Calls ``BaseModel.apply_model`` (k-diffusion input, x0 output: ComfyUI's own
    ``calculate_input`` / ``calculate_denoised``) with the patcher's transformer options, so
    the attn2 replace patches of :func:`attach_attention_hooks` see the call as cond 0.
    Call :meth:`load` first (weights patched and on the device).
    """

    def __init__(self, patcher):
        ensure_supported(patcher)
        self.patcher = patcher
        self.schedule = vp_schedule(patcher)
        self.prediction_type = prediction_type(patcher)
        self.device = comfy.model_management.get_torch_device()

    def load(self):
        comfy.model_management.load_models_gpu([self.patcher])
        self.device = self.patcher.load_device

    def predict_x0_grad(self, x, sigma, cond):
        """``cond``: a context tensor, or SDXL's ``{"c_crossattn", "pooled_output"}`` (:class:`ComfyConceptText`).

        SDXL's ADM vector is built by the model's own ``encode_adm`` from the pooled output
        (differentiable) and the size conditioning: original = target size = the latent's
        pixel size (``x`` x the VAE factor 8), crop (0, 0) [D: the training crops are centre
        crops resized to the training resolution, so this is what the model sees].
        """
        model = self.patcher.model
        B = x.shape[0]
        x = x.to(self.device)
        sigma = torch.as_tensor(sigma).to(self.device, torch.float32).reshape(-1).expand(B)
        opts = dict(self.patcher.model_options.get("transformer_options", {}))
        opts.update({"cond_or_uncond": [0], "sigmas": sigma, "uuids": [None]})
        extra = {}
        if isinstance(cond, dict):
            pooled = cond.get("pooled_output")
            cond = cond["c_crossattn"]
            if getattr(model, "adm_channels", 0):
                if pooled is None:
                    raise UnsupportedModelError(f"{type(model).__name__} needs a pooled text output (SDXL CLIP)")
                h, w = int(x.shape[-2]) * 8, int(x.shape[-1]) * 8
                y = model.encode_adm(pooled_output=pooled.to(self.device), width=w, height=h,
                                     target_width=w, target_height=h, crop_w=0, crop_h=0, device=self.device)
                extra["y"] = y.to(self.device).expand(B, -1)
        elif getattr(model, "adm_channels", 0):
            raise UnsupportedModelError(f"{type(model).__name__} needs the pooled output of an SDXL CLIP "
                                        f"(ADM conditioning); connect the checkpoint's own CLIP")
        ctx = cond.to(self.device).expand(B, -1, -1)
        out = model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=opts, **extra)
        return out.float()


def encode_images_for_training(model, vae, images: torch.Tensor) -> torch.Tensor:
    """``[N, H, W, 3]`` in [0,1] -> model-space latents ``[N, C, h, w]`` (``process_latent_in``), float32."""
    with torch.no_grad():
        lat = vae.encode(images[..., :3])
        return model.model.process_latent_in(lat.float()).float().clone()


def embeddings_dir(create: bool = True) -> str:
    """``<output>/embeddings``, registered as an embeddings folder (appended to the search list).

    ComfyUI registers ``output/checkpoints``, ``output/loras`` ... the same way for what its own
    training nodes write; ``embedding:NAME`` then finds our files in every CLIP loaded after the
    registration (the pack registers it at import).  Writing under the output directory keeps
    a test server's (and a user's) ``models`` folders untouched.
    """
    import os

    import folder_paths

    d = os.path.join(folder_paths.get_output_directory(), "embeddings")
    folder_paths.add_model_folder_path("embeddings", d)
    if create:
        os.makedirs(d, exist_ok=True)
    return d


def find_embedding(name: str):
    """Path of an existing embedding ``name`` (any extension ComfyUI tries, any embeddings folder) or None."""
    import folder_paths

    for ext in (".safetensors", ".pt", ".bin"):
        p = folder_paths.get_full_path("embeddings", name + ext)
        if p is not None:
            return p
    return None


def embedding_files() -> list:
    import folder_paths

    return [f for f in folder_paths.get_filename_list("embeddings") if f.endswith(".safetensors")]


def embedding_path(name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise("embeddings", name)


def save_concept_embedding(path: str, vectors, metadata: dict) -> None:
    """One concept per file, written atomically with string metadata.

    ``vectors``: ``[m, d]`` -> ``{"emb_params": [m, d] float32}`` (SD1.x/SD2.x, spec §8.2), or a
    dict of tensors (SDXL: ``{"clip_l": [m, 768], "clip_g": [m, 1280]}``, see
    :meth:`ComfyConceptText.file_tensors`).
    """
    import os

    from safetensors.torch import save_file

    tensors = vectors if isinstance(vectors, dict) else {CONCEPT_EMBED_KEY: vectors}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={str(k): str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def read_concept_embedding(path: str) -> tuple:
    """``(vectors [m, d], metadata)``.

    An SDXL file (``clip_l`` + ``clip_g``) reads as the two rows side by side ``[m, 768 + 1280]``
    (the concept vector layout of :class:`ComfyConceptText`); otherwise ``emb_params`` or the
    alphabetically first tensor (ComfyUI's rule for other files).
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = sorted(f.keys())
        if not keys:
            raise ValueError(f"{path} holds no tensor")
        meta = f.metadata() or {}
        if "clip_l" in keys and "clip_g" in keys:
            l, g = f.get_tensor("clip_l"), f.get_tensor("clip_g")
            l, g = l.reshape(-1, l.shape[-1]), g.reshape(-1, g.shape[-1])
            if l.shape[0] != g.shape[0]:
                raise ValueError(f"{path}: clip_l holds {l.shape[0]} vectors, clip_g {g.shape[0]}")
            return torch.cat([l, g], -1).float(), meta
        key = CONCEPT_EMBED_KEY if CONCEPT_EMBED_KEY in keys else keys[0]
        t = f.get_tensor(key)
    return t.reshape(-1, t.shape[-1]).float(), meta


def lookup_embedding(name: str, width: int, key: str = "clip_l"):
    """What ComfyUI's prompt syntax ``embedding:NAME`` loads (``comfy.sd1_clip.load_embed``), or None."""
    import comfy.sd1_clip
    import folder_paths

    return comfy.sd1_clip.load_embed(name, folder_paths.get_folder_paths("embeddings"), width, key)


def progress_text(node_id, text: str) -> None:
    """Text under the node in the UI (the current loss); silently nothing without a server."""
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # noqa: BLE001 - no server (tests, scripts)
        pass


class normal_weight_copies:
    """For the ``with`` block: swap the inference-mode parameters/buffers of ``modules`` for normal copies.

    ComfyUI loads checkpoints under ``torch.inference_mode()``, so model weights are
    inference tensors, which autograd may not save for backward — even when only the
    input embeddings need gradients.  The copies are bit-identical; the originals are put
    back on exit (the caller's MODEL/CLIP end up holding exactly the tensors they had).
    Costs one extra copy of the swapped weights while training.
    """

    def __init__(self, *modules):
        self.modules = [m for m in modules if m is not None]
        self.swapped = []

    def __enter__(self):
        with torch.inference_mode(False):
            for root in self.modules:
                for mod in root.modules():
                    for store in ("_parameters", "_buffers"):
                        d = getattr(mod, store)
                        for name, t in list(d.items()):
                            if t is not None and t.is_inference():
                                self.swapped.append((d, name, t))
                                c = t.detach().clone()
                                d[name] = torch.nn.Parameter(c, requires_grad=False) if store == "_parameters" else c
        return self

    def __exit__(self, *exc):
        for d, name, t in reversed(self.swapped):
            d[name] = t
        self.swapped = []
        return False


# ---- pOps (issue 6) ---------------------------------------------------------------------
POPS_EXTENSIONS = {".safetensors", ".pth", ".pt", ".bin", ".ckpt"}


def register_model_folder(name: str, subdir: str, extensions=POPS_EXTENSIONS) -> None:
    """Register ``models/<subdir>`` as model folder ``name`` accepting ``extensions`` (kept when it exists).

    Users can add roots in extra_model_paths.yaml under ``name``; a folder created there
    before us (empty extension set) gets our extensions.
    """
    import os

    import folder_paths

    path = os.path.join(folder_paths.models_dir, subdir)
    entry = folder_paths.folder_names_and_paths.get(name)
    if entry is None:
        folder_paths.folder_names_and_paths[name] = ([path], set(extensions))
        return
    paths, exts = entry
    if path not in paths:
        paths.append(path)
    if isinstance(exts, set):
        exts.update(extensions)
    else:
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | set(extensions))


def pops_compute_dtype(choice: str, n_params: int = 0) -> torch.dtype:
    """``auto``: fp16 (or bf16) where ComfyUI's model management says the device supports it, else fp32."""
    if choice != "auto":
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[choice]
    dev = comfy.model_management.get_torch_device()
    if comfy.model_management.should_use_fp16(dev, model_params=n_params):
        return torch.float16
    if comfy.model_management.should_use_bf16(dev, model_params=n_params):
        return torch.bfloat16
    return torch.float32


def module_patcher(module: torch.nn.Module):
    """A ModelPatcher so ComfyUI's model management moves ``module`` on and off the compute device."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def load_on_device(patcher, extra_memory: int = 0):
    """Load the patched module on its compute device (unloading other models if needed); returns the module."""
    comfy.model_management.load_models_gpu([patcher], memory_required=extra_memory)
    return patcher.model


def intermediate_device():
    return comfy.model_management.intermediate_device()


def make_clip_vision_output(image_embeds: torch.Tensor, **extra):
    """A core CLIP_VISION_OUTPUT carrying only ``image_embeds`` (hidden states set to None)."""
    import comfy.clip_vision

    out = comfy.clip_vision.Output()
    out["image_embeds"] = image_embeds
    out["last_hidden_state"] = None
    out["penultimate_hidden_states"] = None
    for k, v in extra.items():
        out[k] = v
    return out


def image_embedding_consumer(model) -> tuple:
    """``(family, width)`` of the image embedding a MODEL reads through unCLIP conditioning, or raises.

    SDXL-family models (SDXL, SSD-1B, Vega, KOALA...) read the first 1280 values of the
    unCLIP ADM vector as their pooled embedding ("revision"); SD2.x-unCLIP reads 1024/768.
    SD1.x and other families ignore unCLIP conditioning silently, so they are refused.
    """
    import comfy.model_base

    base = model.model
    if isinstance(base, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        return type(base).__name__, 1280
    if isinstance(base, comfy.model_base.SD21UNCLIP):
        return "SD21UNCLIP", int(base.noise_augmentor.time_embed.dim)
    raise UnsupportedModelError(
        f"{type(base).__name__} models do not read an image embedding through unCLIP conditioning (it would be "
        f"ignored); render pOps embeddings with an SDXL model (revision) or SDXL + IP-Adapter (ip-adapter_sdxl)")


def context_width(model) -> int:
    dm = model.get_model_object("diffusion_model")
    w = getattr(dm, "context_dim", None)
    if w is None:
        for name, mod in dm.named_modules():
            if name.endswith("attn2.to_k"):
                return int(mod.in_features)
        raise UnsupportedModelError("cannot find the cross-attention context width of this model")
    return int(w)


def load_clip_vision_any(path: str, heads=None, hidden_act=None):
    """A core CLIP_VISION from a transformers-layout CLIP vision file of any size.

    Files core ComfyUI recognises (ViT-L/H/bigG, SigLIP, DINOv2) go through
    ``comfy.clip_vision.load`` unchanged.  Otherwise the config is read from the shapes
    (heads and activation from the safetensors metadata, else hidden/64 and gelu) and the
    model is built with core's ``ClipVisionModel`` (so encoding is core's code).
    """
    import json
    import os
    import tempfile

    import comfy.clip_vision
    import comfy.utils

    cv = comfy.clip_vision.load(path)
    if cv is not None:
        return cv
    sd, meta = comfy.utils.load_torch_file(path, return_metadata=True)
    meta = meta or {}
    pre = "vision_model."
    need = [pre + "embeddings.class_embedding", pre + "embeddings.patch_embedding.weight",
            pre + "embeddings.position_embedding.weight", "visual_projection.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"{os.path.basename(path)} is not a CLIP vision model (missing {missing[:2]})")
    hidden = sd[pre + "embeddings.class_embedding"].shape[0]
    patch = sd[pre + "embeddings.patch_embedding.weight"].shape[-1]
    n_pos = sd[pre + "embeddings.position_embedding.weight"].shape[0]
    side = round((n_pos - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(pre + "encoder.layers."))
    heads = int(heads or meta.get("num_attention_heads") or max(1, hidden // 64))
    cfg = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": hidden_act or meta.get("hidden_act", "gelu"),
           "hidden_size": hidden, "image_size": side * patch, "initializer_factor": 1.0,
           "initializer_range": 0.02,
           "intermediate_size": sd[pre + "encoder.layers.0.mlp.fc1.weight"].shape[0],
           "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": heads,
           "num_channels": 3, "num_hidden_layers": layers, "patch_size": patch,
           "projection_dim": sd["visual_projection.weight"].shape[0]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    try:
        cv = comfy.clip_vision.ClipVisionModel(f.name)
    finally:
        os.unlink(f.name)
    m, _ = cv.load_sd(sd)
    if m:
        raise ValueError(f"{os.path.basename(path)}: CLIP vision weights do not fit the inferred config "
                         f"(missing {list(m)[:3]})")
    return cv

def text_last_hidden_states(clip, text: str) -> torch.Tensor:
    """``[1, L, D]``: the CLIP-G tower's **last** layer after the final LayerNorm for the real
    tokens of ``text`` (BOS, word pieces, EOS), as pOps' instruct operator uses them.

    SDXL CLIP objects: the ``g`` part (1280-d); a single-tower CLIP: its only tower.  CLIP
    text attention is causal, so the first L states do not depend on the padding.
    """
    toks = clip.tokenize(text)
    key = "g" if "g" in toks else ("l" if "l" in toks else next(iter(toks)))
    if len(toks[key]) != 1:
        raise ValueError(f"{text!r} is longer than one 77-token chunk; the instruct operator takes one word")
    ids = [t[0] for t in toks[key][0]]
    tok = _sub_tokenizer(clip, key)
    end = getattr(tok, "end_token", None)
    if end is None or end not in ids:
        raise ValueError("cannot find the end token in the tokenized text")
    n = ids.index(end) + 1
    c = clip.clone()
    c.clip_layer(-10_000)  # |idx| > number of layers -> ComfyUI's "last" layer (after the final LayerNorm)
    cond = c.encode_from_tokens(toks)
    width = cond.shape[-1]
    if key == "g" and width > 1280:
        cond = cond[..., width - 1280:]  # SDXL concatenates [clip_l, clip_g]
    return cond[:, :n].float()


# ---- InstructBrush (issue 8) ------------------------------------------------------------
# InstructPix2Pix models: detection, the eps prediction with the image latent concatenated
# (for learning, gradients on), cross-attention widths, image encoding in the IP2P convention.


def ip2p_check(model) -> None:
    """Raise unless ``model`` is an eps-prediction InstructPix2Pix UNet (image latent concatenated)."""
    import comfy.model_base

    ensure_supported(model)
    base = model.model
    if not isinstance(base, comfy.model_base.IP2P):
        raise UnsupportedModelError(
            f"InstructBrush needs an InstructPix2Pix model (a UNet whose input takes the image latent, e.g. "
            f"instruct-pix2pix.safetensors); this model is {type(base).__name__}")
    if prediction_type(model) != "epsilon":
        raise UnsupportedModelError("InstructBrush supports eps-prediction InstructPix2Pix models only")


def cross_attention_widths(model) -> list:
    """Output width of ``to_k`` of every cross-attention layer, in forward order."""
    dm = model.get_model_object("diffusion_model")
    out = []
    for layer in cross_attention_layers(model):
        name, i, j = layer.key
        blk = dm.middle_block if name == "middle" else (dm.input_blocks if name == "input" else dm.output_blocks)[i]
        st = next(m for m in blk if hasattr(m, "transformer_blocks"))
        out.append(int(st.transformer_blocks[j].attn2.to_k.weight.shape[0]))
    return out


def ip2p_encode_pairs(model, vae, before: torch.Tensor, after: torch.Tensor) -> tuple:
    """(image-conditioning latents, target latents): ``vae.encode`` of the before images as
    InstructPixToPixConditioning attaches them (unscaled), ``process_latent_in`` of the after images."""
    with torch.no_grad():
        c_img = vae.encode(before[..., :3]).float()
        z0 = model.model.process_latent_in(vae.encode(after[..., :3]).float()).float()
    return c_img.detach(), z0.detach()


def text_condition(clip, text: str) -> torch.Tensor:
    """The cross-attention context tensor ``[1, 77k, D]`` of ``text``."""
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(text)).float().detach()


class ComfyIP2PEps:
    """``predict_eps(z_t, t, image, text)`` of :func:`..kernels.instructbrush.learn` over a hooked
    IP2P ModelPatcher: ``BaseModel.apply_model`` at ``sigma(t)`` with the k-space input
    ``z_t * sqrt(1 + sigma^2)`` and ``c_concat`` = the image latent (zeros for ``None``);
    eps = (x - x0) / sigma. Runs with gradients (call inside ``torch.enable_grad()``)."""

    def __init__(self, patcher, cond: torch.Tensor, uncond: torch.Tensor):
        ip2p_check(patcher)
        self.patcher = patcher
        self.schedule = vp_schedule(patcher)
        self.cond, self.uncond = cond, uncond
        comfy.model_management.load_models_gpu([patcher])
        self.device = patcher.load_device

    def __call__(self, zt, t, image, text: bool):
        B = zt.shape[0]
        sigma = self.schedule.sigma(torch.as_tensor(t).reshape(-1).expand(B).double()).float().to(self.device)
        s = sigma.view(-1, 1, 1, 1)
        x = zt.to(self.device) * (1.0 + s ** 2).sqrt()
        img = torch.zeros_like(x) if image is None else image.to(self.device, x.dtype)
        ctx = (self.cond if text else self.uncond).to(self.device).expand(B, -1, -1)
        opts = dict(self.patcher.model_options.get("transformer_options", {}))
        opts.update({"cond_or_uncond": [0], "sigmas": sigma, "uuids": [None]})
        x0 = self.patcher.model.apply_model(x, sigma, c_concat=img, c_crossattn=ctx, transformer_options=opts).float()
        return ((x - x0) / s).float()


def instruction_folder() -> str:
    """Register ``models/photoops_instructions`` + ``output/photoops_instructions``; returns the output side."""
    return register_folder("photoops_instructions", "photoops_instructions")


def on_run_end(model, callback) -> None:
    """Call ``callback()`` when a sampling run with ``model`` (a ModelPatcher, patched in place) ends,
    normally or not (ComfyUI's ON_CLEANUP callback, which ``outer_sample`` runs in its ``finally``)."""
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, "photoops_instructbrush",
                                lambda patcher: callback())
