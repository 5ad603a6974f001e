"""Prompt-to-Prompt: the attention control on ComfyUI's attn1/attn2 replace patches, and its GUIDER.

Touches ``set_model_attn1_replace`` / ``set_model_attn2_replace`` (through :mod:`.attention`), the
``model_function_wrapper`` of ``calc_cond_batch`` (to feed the source rows their own latent), core
``CFGGuider`` (through :class:`.sampling.CombineGuider`) and CLIP tokenizers (through :mod:`.text`).

:class:`PromptToPromptGuider` evaluates, in ONE batched model call per step, the target prompt and the
negative at the sampler's latent and the source prompt at the source branch's latent (when core's
``calc_cond_batch`` splits that batch for memory, the source's conditioning runs first, having the higher
index, and the control carries its queries / keys to the target's call).  The source branch
is anchored to the inversion (Eta Inversion spec §3 step 8): at step ``i`` its latent IS the inversion's
source ladder at ``sigmas[i]``, whatever the inversion method (ddim, ddpm, eta, dpmpp_2m_sde), so the
guider carries no source state, and the target is stepped by the Inversion Sampler with the inversion's
stored (ddpm) or selected (eta) noise — the noise the anchored source would have received, shared.

Eta noise, ``noise_selection``: ``"editing"`` (the reference's) chooses it during the edit from the
anchored source's prediction at the EDITING CFG (:class:`~...kernels.prompt_to_prompt.EditTimeNoise`,
offered to the Inversion Sampler as the guider's ``photoops_noises``), which needs the source's negative
row too — 4 rows per call instead of 3, only on an eta inversion; ``"inversion"`` replays the noise
Invert chose at its own CFG (equal when the two CFGs are, cheaper).  Otherwise the source's negative row
is not evaluated: with the source anchored its prediction is never used; the source's prompt row is
there for its attention only.  The source's CFG is the plain ``D_u + w (D_c - D_u)`` (the MODEL's
``sampler_cfg_function`` applies to the target only) [ours].
"""
from __future__ import annotations

import math

import torch

from ...kernels.inversion_state import Inversion
from ...kernels.prompt_to_prompt import EditTimeNoise, PromptToPromptError
from .attention import PhotoOpsAttn2Replace, attach_attention_hooks, cross_attention_layers
from .sampling import ROWS_KEY, CombineGuider
from .text import _real_tokens, _sub_tokenizer, tokenize_word

SOURCE_KEY = "source"
SOURCE_NEG_KEY = "source_negative"
NOISE_SELECTION = ("editing", "inversion")


def attach_control(model, control):
    """A clone of ``model`` whose cross- and self-attention layers run ``control`` (input untouched)."""
    m = attach_attention_hooks(model, control.cross_hooks)
    existing = dict(m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {}))
    for layer in cross_attention_layers(model):
        key = layer.key
        previous = existing.get(key, existing.get(key[:2]))
        m.set_model_attn1_replace(PhotoOpsAttn2Replace(control.self_hooks, layer, previous), key[0], key[1], key[2])
    return m


def prompt_tokens(clip, text: str, what: str) -> dict:
    """``{"ids": BOS..EOS ids of the first chunk, "chunks": n, "words": [ids per whitespace word]}``."""
    toks = clip.tokenize(text)
    key = "l" if "l" in toks else next(iter(toks))
    chunks = toks[key]
    tok = _sub_tokenizer(clip, key)
    end = getattr(tok, "end_token", None)
    ids = [item[0] for item in chunks[0]]
    if any(isinstance(t, torch.Tensor) for t in ids):
        raise PromptToPromptError(f"the {what} prompt holds an embedding; Prompt-to-Prompt aligns word tokens only")
    n = ids[1:].index(end) + 2 if end in ids[1:] else len(ids)
    words = [_real_tokens(clip, w)[0] for w in text.split()]
    return {"ids": ids[:n], "chunks": len(chunks), "words": words, "context": len(chunks) * len(chunks[0])}


def word_positions(clip, text: str, words: str, what: str) -> list:
    """Token positions of each comma-separated word of ``words`` in ``text`` (errors name the word)."""
    out = []
    for w in [w.strip() for w in words.split(",") if w.strip()]:
        try:
            out.append(tokenize_word(clip, text, w)["positions"])
        except ValueError as e:
            raise PromptToPromptError(f"{what}: {e}") from e
    return out


def _swap_wrapper(source_indices, box: dict, previous):
    """``model_function_wrapper``: the chunks of the source conditionings get the source latent."""

    def wrapper(apply_model, args):
        opts = args["c"].get("transformer_options", {})
        rows = list(opts.get(ROWS_KEY) or args["cond_or_uncond"])
        x = args["input"]
        if any(r in source_indices for r in rows):
            per = x.shape[0] // len(rows)
            x_src = box["x_src"]
            if tuple(x_src.shape[1:]) != tuple(x.shape[1:]) or per % x_src.shape[0]:
                raise PromptToPromptError(f"the source latent {tuple(x_src.shape)} does not fit the model input "
                                          f"{tuple(x.shape)} (area conditioning is not supported)")
            x = x.clone()
            for c, r in enumerate(rows):
                if r in source_indices:
                    x[c * per:(c + 1) * per] = x_src.to(x).repeat(per // x_src.shape[0], 1, 1, 1)
            args = {**args, "input": x}
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    return wrapper


class PromptToPromptGuider(CombineGuider):
    """Target CFG (``D_u + w (D_t - D_u)``, or the MODEL's own CFG function) with the source row
    evaluated in the same call on the anchored source latent.  Needs the Inversion Sampler (it reads
    the INVERSION from the SAMPLER it is run with)."""

    def __init__(self, model_patcher, target, negative, source, cfg: float, control, noise_selection="editing"):
        if noise_selection not in NOISE_SELECTION:
            raise PromptToPromptError(f"noise_selection must be one of {NOISE_SELECTION}, got {noise_selection!r}")
        self.control, self.noise_selection = control, noise_selection
        self.box, self.photoops_noises = {}, None
        self._conds = {"positive": target, "negative": negative, SOURCE_KEY: source}
        super().__init__(model_patcher, dict(self._conds), ["positive", "negative", SOURCE_KEY], self._combine, cfg,
                         on_run_start=self._start)

    def _start(self, sigmas, sampler):
        inv = (getattr(sampler, "extra_options", None) or {}).get("inversion")
        if not isinstance(inv, Inversion):
            raise PromptToPromptError("the Prompt-to-Prompt Guide runs with the Inversion Sampler: its source branch "
                                      "follows the inversion of the photo (connect Inversion Sampler as the SAMPLER)")
        if inv.source_ladder is None:
            raise PromptToPromptError("this INVERSION holds no source ladder (saved by an older PhotoOps): invert "
                                      "the photo again")
        self.box = {"inv": inv, "sigmas": inv.sigmas.double().cpu()}
        self.control.reset()
        self.photoops_noises = None
        order = ["positive", "negative", SOURCE_KEY]
        if inv.method == "eta" and self.noise_selection == "editing" and inv.noises is not None:
            eta = inv.eta.float()
            per_step = eta if eta.ndim == 1 else eta.flatten(1).amax(1)     # binary region masks: the scalar eta
            self.photoops_noises = EditTimeNoise(inv.source_ladder, inv.sigmas, per_step, inv.skip,
                                                 int(inv.info.get("candidates", 10)), inv.seed,
                                                 bool(inv.info.get("store_optimal_noise", False)))
            order.append(SOURCE_NEG_KEY)
        self.set_rows(order)

    def set_rows(self, order):
        """The conditionings evaluated per call (the source's negative only for edit-time noise)."""
        self.order = list(order)
        self.flags = [1 if k in ("negative", SOURCE_NEG_KEY) else 0 for k in self.order]   # core CFG's uncond flag
        conds = dict(self._conds)
        if SOURCE_NEG_KEY in order:
            conds[SOURCE_NEG_KEY] = self._conds["negative"]
        self.inner_set_conds(conds)

    def _combine(self, x, sigma, outs, step, cfg_denoised=None):
        if self.photoops_noises is not None:                        # the anchored source at the editing CFG
            d_src = outs[3] + self.cfg * (outs[2] - outs[3])
            self.photoops_noises.select(self.box["i"], self.box["x_src"], d_src)
        if cfg_denoised is not None:
            return cfg_denoised
        d_c, d_u = outs[0], outs[1]
        return d_u + self.cfg * (d_c - d_u)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        inv, s = self.box["inv"], self.box["sigmas"]
        sigma = float(timestep.flatten()[0])
        i = int((s[:-1] - sigma).abs().argmin())
        if not math.isclose(float(s[i]), sigma, rel_tol=1e-4, abs_tol=1e-7) or i < inv.skip:
            raise PromptToPromptError(f"sigma {sigma:.5g} is not a replayed step of the inversion")
        self.control.begin_step(i - inv.skip, inv.steps - inv.skip)
        self.box["i"] = i
        self.box["x_src"] = inv.source_ladder[i - inv.skip].to(device=x.device, dtype=x.dtype)
        if self.box["x_src"].shape != x.shape:
            raise PromptToPromptError(f"the latent {tuple(x.shape)} is not the inversion's {inv.latent_shape}")
        opts = dict(model_options)
        sources = {self.order.index(k) for k in (SOURCE_KEY, SOURCE_NEG_KEY) if k in self.order}
        opts["model_function_wrapper"] = _swap_wrapper(sources, self.box, model_options.get("model_function_wrapper"))
        return super().predict_noise(x, timestep, opts, seed)
