"""Flow attention: recording joint (MM-DiT) attention of SD3 / SD3.5 and Flux models.

Touches ``transformer_options["patches_replace"]["dit"]`` (``ModelPatcher.set_model_patch_replace``:
SD3 joint blocks and Flux double blocks are ``("double_block", i)``, Flux single blocks
``("single_block", i)``), ``transformer_options["optimized_attention_override"]`` (called by every
``@wrap_attn`` attention function of ``comfy/ldm/modules/attention.py`` with the raw function), the
APPLY_MODEL wrapper and the ON_PRE_RUN callback.  Spec ``rectified-flow.md`` §3.2:

* a replace patch on each block calls the block (or a replace another pack installed first) with
  ``transformer_options`` tagged ``LAYER_KEY: (layer, L_txt, L)``; ``L_txt`` is the block's text length
  (``args["txt"].shape[1]``; Flux single blocks, whose ``img`` is ``cat(txt, img)``, take the text length
  of the model call's context, read by the APPLY_MODEL wrapper with the latent's size);
* the override records (kernels ``joint_attention``) only tagged calls whose sequence is exactly ``L``
  (so SD3.5's image-only ``attn2`` call is skipped), then returns the original function's output
  (or the previously installed override's), untouched: sampling is bit-identical with capture on.

The :class:`JointCapture` hub is shared by every clone of the patched MODEL (``__deepcopy__`` returns it):
the recorders a node holds see every call, as the UNet hooks do.
"""
from __future__ import annotations

import comfy.patcher_extension
import torch

from ...kernels.joint_attention import JointTokenMapRecorder, split_heads
from ...kernels.protocol import CallInfo, LayerInfo, UnsupportedModelError, step_of_sigma
from ...kernels.tokens import WordNotFoundError, find_word_positions
from .flow import family, is_flow
from .text import _decoder, _sub_tokenizer

LAYER_KEY = "photoops_joint_layer"
HOOK_KEY = "photoops_joint_attention"


def joint_layers(model) -> list:
    """LayerInfo of every joint-attention block in forward order: ``place`` ``"double"`` (SD3 joint blocks,
    Flux double blocks) or ``"single"`` (Flux single blocks); ``key`` is the ``dit`` patch key."""
    if not is_flow(model):
        raise UnsupportedModelError(f"joint attention is for rectified-flow DiTs (SD3, SD3.5, Flux); this model "
                                    f"is {family(model)}")
    dm = model.get_model_object("diffusion_model")
    keys = []
    if hasattr(dm, "joint_blocks"):                                   # MMDiT (SD3 / SD3.5)
        keys = [(("double_block", i), "double") for i in range(len(dm.joint_blocks))]
    elif hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks"):      # Flux
        keys = [(("double_block", i), "double") for i in range(len(dm.double_blocks))]
        keys += [(("single_block", i), "single") for i in range(len(dm.single_blocks))]
    if not keys:
        raise UnsupportedModelError(f"PhotoOps records joint attention of SD3 / SD3.5 (MMDiT) and Flux models; "
                                    f"this model is {family(model)} ({type(dm).__name__})")
    return [LayerInfo(key=k, place=p, order=n) for n, (k, p) in enumerate(keys)]


class JointCapture:
    """The recorders of one capture, the APPLY_MODEL wrapper and the attention override."""

    def __init__(self, recorders, previous_override=None):
        self.recorders = list(recorders)
        self.previous_override = previous_override
        self.latent_hw, self.ctx_len = None, None

    def __deepcopy__(self, memo):
        memo[id(self)] = self
        return self

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, *args, **kwargs):
        """APPLY_MODEL wrapper: the latent's size and the context length of this model call."""
        self.latent_hw = tuple(int(v) for v in x.shape[-2:])
        self.ctx_len = None if c_crossattn is None else int(c_crossattn.shape[1])
        return executor(x, t, c_concat, c_crossattn, *args, **kwargs)

    def reset(self):
        for r in self.recorders:
            r.reset()

    def override(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        tag = to.get(LAYER_KEY)
        if tag is not None and self.recorders and self.latent_hw is not None:
            with torch.no_grad():
                self._record(tag, to, args, kwargs)
        if self.previous_override is not None:
            return self.previous_override(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _record(self, tag, to, args, kwargs):
        layer, txt_len, total = tag
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        skip = bool(kwargs.get("skip_reshape", False))
        if (q.shape[2] if skip else q.shape[1]) != total or txt_len is None or not 0 < txt_len < total:
            return                                        # e.g. SD3.5's image-only self-attention call
        chunks = list(to.get("photoops_rows") or to.get("cond_or_uncond") or [0])
        sig = to.get("sigmas")
        sigma = float(sig.flatten()[0]) if isinstance(sig, torch.Tensor) else float(sig or 0.0)
        step, steps = step_of_sigma(sigma, to.get("sample_sigmas"))
        call = CallInfo(sigma=sigma, chunks=chunks, rows_per_chunk=q.shape[0] // max(len(chunks), 1),
                        latent_hw=self.latent_hw, step=step, total_steps=steps)
        wanting = [r for r in self.recorders if r.wants(layer, call)]
        if not wanting:
            return
        qh, kh = split_heads(q, heads, skip), split_heads(k, heads, skip)
        for r in wanting:
            r.record(qh, kh, txt_len, total - txt_len, layer, call, mask=kwargs.get("mask"))


class DitLayerTag:
    """The ``dit`` replace patch of one block: tags ``transformer_options`` with the layer, then runs the
    block through ``previous`` (another pack's replace installed first) or the original block."""

    def __init__(self, layer: LayerInfo, capture: JointCapture, previous=None):
        self.layer, self.capture, self.previous = layer, capture, previous

    def __call__(self, args, extra):
        if self.layer.place == "double":
            txt = args.get("txt")
            txt_len = None if txt is None else int(txt.shape[1])
            total = int(args["img"].shape[1]) + (txt_len or 0)
        else:
            txt_len, total = self.capture.ctx_len, int(args["img"].shape[1])
        to = dict(args.get("transformer_options") or {})
        to[LAYER_KEY] = (self.layer, txt_len, total)
        tagged = {**args, "transformer_options": to}
        if self.previous is not None:
            return self.previous(tagged, extra)
        return extra["original_block"](tagged)


def attach_joint_capture(model, recorders, on_run_start=None):
    """A clone of ``model`` (SD3 / Flux) whose joint attention feeds ``recorders``
    (:class:`~...kernels.joint_attention.JointTokenMapRecorder`); the input model is not touched.
    ``on_run_start()`` runs when a sampling run starts (after the recorders are reset)."""
    layers = joint_layers(model)
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    capture = JointCapture(recorders, previous_override=to.get("optimized_attention_override"))
    existing = dict(to.get("patches_replace", {}).get("dit", {}))
    for layer in layers:
        kind, i = layer.key
        m.set_model_patch_replace(DitLayerTag(layer, capture, existing.get(layer.key)), "dit", kind, i)
    to = m.model_options["transformer_options"]
    to["optimized_attention_override"] = capture.override
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, HOOK_KEY, capture)

    def pre_run(patcher):
        capture.reset()
        if on_run_start is not None:
            on_run_start()

    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, HOOK_KEY, pre_run)
    m.photoops_joint_capture = capture
    return m


# ----------------------------------------------------------------------------- token positions

def _token_ids(clip, text: str, key: str) -> tuple:
    toks = clip.tokenize(text)
    if key not in toks:
        raise ValueError(f"this CLIP has no {key!r} tokenizer")
    tok = _sub_tokenizer(clip, key)
    if key == "t5xxl":
        tok = getattr(clip.tokenizer, "t5xxl", tok)
    special = {t for t in (getattr(tok, "start_token", None), getattr(tok, "end_token", None),
                           getattr(tok, "pad_token", None)) if t is not None}
    return toks[key], tok, special


def _positions_in(clip, prompt: str, word: str, key: str) -> tuple:
    """``(positions, sequence length)`` of ``word`` in ``prompt`` for sub-tokenizer ``key``."""
    ptoks, tok, special = _token_ids(clip, prompt, key)
    wtoks, _, _ = _token_ids(clip, word.strip(), key)
    query = [it[0] for chunk in wtoks for it in chunk if isinstance(it[0], torch.Tensor) or it[0] not in special]
    dec = _decoder(tok)
    pos = find_word_positions(ptoks, query, decode=lambda i: dec(i).replace("\u2581", ""), special=tuple(special),
                              word=word)
    return pos, sum(len(c) for c in ptoks)


def flow_word_positions(clip, prompt: str, word: str) -> dict:
    """Text-key positions of ``word`` in ``prompt`` as a flow model's context lays the tokens out.

    By the CLIP object's tokenizer (spec §3.1 / §3.4): an SD3 tokenizer (``l``, ``g``, ``t5xxl``) gives
    the CLIP-L/G positions (77-token chunks first) and, as optional positions, the T5 positions after them
    (used when the context holds T5 tokens, i.e. a T5 encoder was loaded); a Flux tokenizer (``l``,
    ``t5xxl``) the T5 positions only (Flux's context is T5; CLIP-L feeds only the pooled vector); a plain
    CLIP tokenizer (``CLIPLoader`` type ``sd3`` with CLIP-L only) its CLIP positions.
    Returns ``{"positions", "optional_positions", "prompt_len"}``.
    """
    if not word or not word.strip():
        raise ValueError("the word to capture is empty")
    keys = set(clip.tokenize(prompt))
    if "g" in keys and "t5xxl" in keys:                                  # SD3: CLIP chunks, then T5
        pos, n_clip = _positions_in(clip, prompt, word, "l")
        try:
            t5, _ = _positions_in(clip, prompt, word, "t5xxl")
        except WordNotFoundError:        # T5 splits the word otherwise: the CLIP positions carry the map
            t5 = []
        return {"positions": pos, "optional_positions": [n_clip + p for p in t5], "prompt_len": None}
    if "t5xxl" in keys:                                                  # Flux: T5 only
        pos, n = _positions_in(clip, prompt, word, "t5xxl")
        return {"positions": pos, "optional_positions": [], "prompt_len": n}
    key = "l" if "l" in keys else min(keys)
    pos, n = _positions_in(clip, prompt, word, key)
    return {"positions": pos, "optional_positions": [], "prompt_len": n}


def make_recorder(where: dict, cond_index: int = 0, layers=("double",), steps=(0.0, 1.0)) -> JointTokenMapRecorder:
    """A recorder for the positions :func:`flow_word_positions` returned."""
    return JointTokenMapRecorder(where["positions"], where["optional_positions"], prompt_len=where["prompt_len"],
                                 cond_index=cond_index, layers=layers, steps=steps)
