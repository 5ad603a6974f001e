"""pOps operators: the Kandinsky 2.2 prior as an operator on CLIP image embeddings.

Paper: Richardson et al., "pOps: Photo-Inspired Diffusion Operators", arXiv 2406.01300.
Spec: ``shared/docs/algorithms/pops-operators.md`` (section numbers below refer to it).

Contents, all plain torch:

* :class:`PriorConfig` / :class:`OperatorPrior` — the diffusers ``PriorTransformer`` maths
  (§4.1, §4.2) with the same parameter names, so a released ``learned_prior.pth`` state
  dict loads directly.  Two forward paths:

  - :meth:`OperatorPrior.forward` — the full 81-token pass exactly as diffusers computes
    it (additive −10000 key mask, causal mask only when a mask is given, the ``prd``
    token read out).  Used for parity tests.
  - :meth:`OperatorPrior.prefix` + :meth:`OperatorPrior.step` — **[ours]** the same
    function computed cheaply for sampling.  With a mask the attention is causal, so the
    condition tokens and the ``proj_embedding`` token (positions < 78) never see the
    timestep, noised-embedding and ``prd`` tokens; their keys/values in every layer do
    not depend on ``t`` or ``x_t`` and are computed once per sampling run (a KV cache).
    Masked condition slots get weight ``exp(−10000) = 0`` in every softmax they enter
    (fp32, fp16 and bf16 all underflow to exactly 0), so they are dropped from the
    prefix.  Each step then runs 3 tokens instead of 81.  Equal to the full pass up to
    float summation order (tested to 1e-5).

* :func:`build_condition` — §4.3 token layout: ``H[0]=a``, ``H[1]=b`` (or the text
  tokens of *instruct*), zeros elsewhere, mask 1 on filled slots; a dropped input is a
  zero vector in normalised space with its mask kept at 1; ``p = 0``.
* :func:`unclip_schedule` / :func:`sample` — §7: ``UnCLIPScheduler`` with
  ``prediction_type="sample"``, ``variance_type="fixed_small_log"``, clipping at ±10,
  timesteps ``round(i·999/(S−1))`` reversed, CFG ``f(H⁻) + w·(f(H) − f(H⁻))`` only when
  ``w > 1``, noise from one CPU generator seeded with ``seed`` (initial ``[B, D]`` draw,
  then one ``[B, D]`` draw per step with ``t > 0``), output ``x·σ + μ``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OPERATOR_DEFAULTS",
    "EmbeddingWidthError",
    "OperatorPrior",
    "PrefixCache",
    "PriorConfig",
    "build_condition",
    "check_width",
    "denormalize",
    "normalize",
    "sample",
    "unclip_schedule",
]

#: §3: default prior guidance per released operator [repo: configs/infer/*.yaml].
OPERATOR_DEFAULTS = {"texturing": 8.0, "union": 8.0, "scene": 1.0, "instruct": 1.0}

MASK_VALUE = -10000.0  # diffusers' additive mask value (§4.2 step 4)


class EmbeddingWidthError(ValueError):
    """An input embedding whose width does not match the operator's ``embedding_dim``."""


@dataclass(frozen=True)
class PriorConfig:
    """``PriorTransformer`` config (§4.1).  Defaults are the Kandinsky 2.2 prior."""

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 1280
    num_embeddings: int = 77
    additional_embeddings: int = 4
    time_embed_dim: int | None = None  # -> inner_dim
    clip_embed_dim: int | None = None  # -> embedding_dim

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.clip_embed_dim or self.embedding_dim

    def diffusers_kwargs(self) -> dict:
        """Keyword arguments that build the same network as ``diffusers.PriorTransformer``."""
        return {"num_attention_heads": self.num_attention_heads, "attention_head_dim": self.attention_head_dim,
                    "num_layers": self.num_layers, "embedding_dim": self.embedding_dim,
                    "num_embeddings": self.num_embeddings, "additional_embeddings": self.additional_embeddings,
                    "dropout": 0.0, "time_embed_act_fn": "silu", "norm_in_type": None, "embedding_proj_norm_type": None,
                    "encoder_hid_proj_type": "linear", "added_emb_type": "prd", "time_embed_dim": self.time_embed_dim,
                    "embedding_proj_dim": None, "clip_embed_dim": self.clip_embed_dim}


# ---------------------------------------------------------------------------------------
# network (parameter names = diffusers PriorTransformer state-dict keys)
# ---------------------------------------------------------------------------------------
class _Linear2(nn.Module):
    """``TimestepEmbedding``: linear_1 -> SiLU -> linear_2."""

    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.linear_2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _Attention(nn.Module):
    def __init__(self, dim, heads, head_dim):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def split(self, x):  # [B, N, H*d] -> [B, H, N, d]
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def merge(self, x):  # [B, H, N, d] -> [B, N, H*d]
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)


class _GELUProj(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return F.gelu(self.proj(x))


class _FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class _Block(nn.Module):
    """Pre-LN self-attention + pre-LN GELU MLP (diffusers ``BasicTransformerBlock`` as the prior uses it)."""

    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = _FeedForward(dim)

    def qkv(self, h):
        n = self.norm1(h)
        a = self.attn1
        return a.split(a.to_q(n)), a.split(a.to_k(n)), a.split(a.to_v(n))

    def finish(self, h, q, k, v, mask):
        a = self.attn1
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + a.to_out[0](a.merge(o))
        return h + self.ff(self.norm3(h))


@dataclass
class PrefixCache:
    """Per-layer keys/values of the t- and x_t-independent prefix tokens (see module doc)."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    n_prefix: int = 0


class OperatorPrior(nn.Module):
    """The diffusers ``PriorTransformer`` (Kandinsky 2.2 config family) in plain torch.

    State-dict keys are the diffusers names; ``clip_mean``/``clip_std`` are *not* part of
    this module (the released operators do not carry them, §8) — they live beside it.
    """

    def __init__(self, config: PriorConfig = PriorConfig()):
        super().__init__()
        c = self.config = config
        d = c.inner_dim
        self.time_embedding = _Linear2(d, c.time_embed_dim or d, d)
        self.proj_in = nn.Linear(c.embedding_dim, d)
        self.embedding_proj = nn.Linear(c.embedding_dim, d)
        self.encoder_hidden_states_proj = nn.Linear(c.embedding_dim, d)
        self.positional_embedding = nn.Parameter(torch.zeros(1, c.num_embeddings + c.additional_embeddings, d))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.transformer_blocks = nn.ModuleList(
            [_Block(d, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_layers)])
        self.norm_out = nn.LayerNorm(d)
        self.proj_to_clip_embeddings = nn.Linear(d, c.out_dim)

    # -- pieces ----------------------------------------------------------------------
    @property
    def dtype(self):
        return self.proj_in.weight.dtype

    def time_embed(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """§4.2 step 1: sinusoidal (flip_sin_to_cos, shift 0, computed in fp32) -> MLP."""
        d = self.config.inner_dim
        t = torch.as_tensor(t, device=self.proj_in.weight.device).reshape(-1)
        t = (t * torch.ones(batch, dtype=t.dtype, device=t.device)).float()
        half = d // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        arg = t[:, None] * freqs[None]
        emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
        return self.time_embedding(emb.to(self.dtype))

    def _check(self, x_t, proj, H):
        c = self.config
        for name, v, shape in (("x_t", x_t, (c.embedding_dim,)), ("proj_embedding", proj, (c.embedding_dim,)),
                               ("condition tokens H", H, (c.num_embeddings, c.embedding_dim))):
            if tuple(v.shape[1:]) != shape:
                raise ValueError(f"{name} has shape {tuple(v.shape)}; the prior expects [batch, "
                                 f"{', '.join(map(str, shape))}] (§4.2: H holds exactly {c.num_embeddings} slots)")

    # -- the full pass (diffusers maths) ---------------------------------------------
    def forward(self, x_t, t, proj_embedding, encoder_hidden_states, attention_mask=None):
        """Predicted x_0 (normalised space), ``[B, clip_embed_dim]`` — §4.2, all 81 tokens."""
        self._check(x_t, proj_embedding, encoder_hidden_states)
        b = x_t.shape[0]
        dt = self.dtype
        tau = self.time_embed(t, b)
        seq = torch.cat([self.encoder_hidden_states_proj(encoder_hidden_states.to(dt)),
                         self.embedding_proj(proj_embedding.to(dt))[:, None],
                         tau[:, None], self.proj_in(x_t.to(dt))[:, None],
                         self.prd_embedding.to(dt).expand(b, -1, -1)], dim=1)
        h = seq + self.positional_embedding.to(dt)
        mask = None
        if attention_mask is not None:
            n = h.shape[1]
            m = (1 - attention_mask.to(dt)) * MASK_VALUE
            m = F.pad(m, (0, self.config.additional_embeddings), value=0.0)
            causal = torch.full((n, n), MASK_VALUE, device=h.device, dtype=torch.float32).triu_(1)
            mask = (m[:, None, :] + causal.to(dt))[:, None]  # [B, 1, N, N], broadcast over heads
        for blk in self.transformer_blocks:
            q, k, v = blk.qkv(h)
            h = blk.finish(h, q, k, v, mask)
        return self.proj_to_clip_embeddings(self.norm_out(h[:, -1]))

    # -- the cached pass (sampling) ---------------------------------------------------
    def prefix(self, proj_embedding, encoder_hidden_states, attention_mask) -> PrefixCache:
        """Run the kept condition tokens and the ``proj_embedding`` token once; cache K/V.

        ``attention_mask`` ([B, 77], 0/1) must be the same for every batch row.
        """
        c = self.config
        if attention_mask is None:
            raise ValueError("the cached prior pass needs an attention mask (without one the prior is not causal)")
        x0 = torch.zeros(proj_embedding.shape[0], c.embedding_dim, device=proj_embedding.device)
        self._check(x0, proj_embedding, encoder_hidden_states)
        m = attention_mask.bool()
        if not torch.equal(m, m[:1].expand_as(m)):
            raise ValueError("the cached prior pass needs the same condition mask for every batch row")
        keep = torch.nonzero(m[0], as_tuple=False).flatten()
        dt = self.dtype
        pos = self.positional_embedding.to(dt)[0]
        cond = self.encoder_hidden_states_proj(encoder_hidden_states[:, keep].to(dt)) + pos[keep]
        ptok = self.embedding_proj(proj_embedding.to(dt))[:, None] + pos[c.num_embeddings]
        h = torch.cat([cond, ptok], dim=1)
        n = h.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril_()
        cache = PrefixCache(n_prefix=n)
        for blk in self.transformer_blocks:
            q, k, v = blk.qkv(h)
            cache.keys.append(k)
            cache.values.append(v)
            h = blk.finish(h, q, k, v, causal)
        return cache

    def step(self, x_t, t, cache: PrefixCache) -> torch.Tensor:
        """Predicted x_0 for the suffix tokens [τ, X, prd] attending to the cached prefix."""
        c = self.config
        b = x_t.shape[0]
        if tuple(x_t.shape[1:]) != (c.embedding_dim,):
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected [batch, {c.embedding_dim}]")
        dt = self.dtype
        pos = self.positional_embedding.to(dt)[0, c.num_embeddings + 1:]
        h = torch.cat([self.time_embed(t, b)[:, None], self.proj_in(x_t.to(dt))[:, None],
                       self.prd_embedding.to(dt).expand(b, -1, -1)], dim=1) + pos
        p = cache.n_prefix
        mask = torch.ones(3, p + 3, dtype=torch.bool, device=h.device)
        mask[:, p:] = torch.ones(3, 3, dtype=torch.bool, device=h.device).tril_()
        for blk, kc, vc in zip(self.transformer_blocks, cache.keys, cache.values):
            q, k, v = blk.qkv(h)
            h = blk.finish(h, q, torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2), mask)
        return self.proj_to_clip_embeddings(self.norm_out(h[:, -1]))


# ---------------------------------------------------------------------------------------
# conditioning, schedule, sampler
# ---------------------------------------------------------------------------------------
def normalize(e: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """n(e) = (e − μ)/σ (§2), in fp32."""
    return (e.float() - mean.float().reshape(1, -1)) / std.float().reshape(1, -1)


def denormalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """n⁻¹(z) = z·σ + μ (§4.2 step 6), in fp32."""
    return z.float() * std.float().reshape(1, -1) + mean.float().reshape(1, -1)


_KNOWN_WIDTHS = {768: "CLIP ViT-L/14", 1024: "CLIP ViT-H/14", 1280: "OpenCLIP ViT-bigG/14"}


def check_width(name: str, e: torch.Tensor, dim: int) -> torch.Tensor:
    """``e`` as ``[B, dim]``; a clear :class:`EmbeddingWidthError` naming both widths otherwise."""
    if e.ndim == 1:
        e = e[None]
    if e.ndim != 2:
        raise EmbeddingWidthError(f"{name}: expected an image embedding [batch, {dim}], got shape {tuple(e.shape)} "
                                  f"(pOps uses image_embeds, not hidden states)")
    if e.shape[-1] != dim:
        got = _KNOWN_WIDTHS.get(e.shape[-1], "an unknown encoder")
        want = _KNOWN_WIDTHS.get(dim, "its training encoder")
        raise EmbeddingWidthError(f"{name} is a {e.shape[-1]}-d embedding ({got}), but this operator works on "
                                  f"{dim}-d embeddings ({want}); encode the image with the matching CLIP vision model")
    return e


def build_condition(inputs: Sequence[torch.Tensor | None], num_embeddings: int = 77,
                    text_tokens: torch.Tensor | None = None, dropped: Sequence[bool] = ()):
    """§4.3: ``(H, H_neg, M)`` for normalised inputs ``[B, D]`` placed in slots 0, 1, ...

    * ``inputs[i]`` ``None`` or ``dropped[i]`` -> a zero vector in normalised space, mask kept 1.
    * ``text_tokens`` ``[B, L, D]`` (instruct) fill the slots after the image inputs.
    * The negative (CFG) branch ``H_neg`` is all zeros with the **same** mask (§7 step 4).
    """
    present = [x for x in inputs if x is not None]
    if text_tokens is not None:
        present.append(text_tokens)
    if not present:
        raise ValueError("at least one input embedding (or text) is needed to build the condition")
    ref = present[0]
    b, d = ref.shape[0], ref.shape[-1]
    L = 0 if text_tokens is None else text_tokens.shape[1]
    k = len(inputs) + L
    if k > num_embeddings:
        raise ValueError(f"{k} condition tokens do not fit into the prior's {num_embeddings} slots")
    H = torch.zeros(b, num_embeddings, d, dtype=torch.float32, device=ref.device)
    for i, x in enumerate(inputs):
        if x is None or (i < len(dropped) and dropped[i]):
            continue
        if x.shape[0] != b:
            raise ValueError(f"input {i} has batch {x.shape[0]}, input 0 has {b}")
        H[:, i] = x.float()
    if L:
        H[:, len(inputs):k] = text_tokens.float()
    M = torch.zeros(b, num_embeddings, dtype=torch.long, device=ref.device)
    M[:, :k] = 1
    return H, torch.zeros_like(H), M


@dataclass(frozen=True)
class UnclipSchedule:
    timesteps: list
    alphas_cumprod: torch.Tensor  # float32 [T]
    betas: torch.Tensor
    alphas: torch.Tensor


def unclip_schedule(steps: int, num_train_timesteps: int = 1000) -> UnclipSchedule:
    """``squaredcos_cap_v2`` betas (max 0.999) in float32 as diffusers builds them, and the
    UnCLIP timesteps ``round(i·(T−1)/(S−1))`` reversed (§7 step 5)."""
    if steps < 2:
        raise ValueError("the UnCLIP schedule needs at least 2 steps")

    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],  # cpu: a schedule
                         dtype=torch.float32)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ratio = (T - 1) / (steps - 1)
    ts = [round(i * ratio) for i in range(steps)][::-1]
    # numpy rounds half to even; Python's round does too.
    return UnclipSchedule(ts, ac, betas, alphas)


def _unclip_step(sch: UnclipSchedule, x0, t: int, prev: int | None, x, noise_fn, clip_range: float):
    """One ``UnCLIPScheduler.step`` (sample prediction, fixed_small_log), float32 scalars."""
    if prev is None:
        prev = t - 1
    a_t = sch.alphas_cumprod[t]
    a_prev = sch.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)  # cpu: a schedule scalar (0-dim)
    if prev == t - 1:
        beta, alpha = sch.betas[t], sch.alphas[t]
    else:
        beta = 1 - a_t / a_prev
        alpha = 1 - beta
    x0 = x0.clamp(-clip_range, clip_range)
    c0 = (a_prev ** 0.5 * beta) / (1 - a_t)
    ct = alpha ** 0.5 * (1 - a_prev) / (1 - a_t)
    out = c0.to(x.device) * x0 + ct.to(x.device) * x
    if t > 0:
        var = (1 - a_prev) / (1 - a_t) * beta
        std = torch.exp(0.5 * torch.log(torch.clamp(var, min=1e-20)))
        out = out + std.to(x.device) * noise_fn()
    return out


def sample(prior: OperatorPrior, H: torch.Tensor, M: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *,
           steps: int = 25, guidance: float = 1.0, seed: int = 0, H_neg: torch.Tensor | None = None,
           clip_range: float = 10.0, cached: bool = True, callback: Callable[[int, int], None] | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """§7: sample the operator; returns the **raw** CLIP image embedding ``[B, D]`` (fp32).

    ``H`` [B, 77, D] and ``M`` [B, 77] come from :func:`build_condition` (normalised space).
    ``guidance > 1`` runs CFG with ``H_neg`` (default zeros) in one batched call,
    ``[negative, positive]``.  Noise: one CPU ``torch.Generator`` seeded with ``seed``
    draws the initial ``[B, D]`` and each step's ``[B, D]`` (the authors' pipeline with a
    CPU generator).  ``callback(i, steps)`` after every step (progress / interrupt).
    ``cached=False`` uses the full 81-token pass (reference; same result up to rounding).
    """
    c = prior.config
    dev, dt = prior.proj_in.weight.device, prior.dtype
    b, d = H.shape[0], c.embedding_dim
    cfg = guidance > 1.0
    if cfg:
        H_neg = torch.zeros_like(H) if H_neg is None else H_neg
        Hb, Mb = torch.cat([H_neg, H]), torch.cat([M, M])
    else:
        Hb, Mb = H, M
    Hb, Mb = Hb.to(dev, dt), Mb.to(dev)
    P = torch.zeros(Hb.shape[0], d, device=dev, dtype=dt)  # p = 0 (§4.3)
    gen = generator if generator is not None else torch.Generator("cpu").manual_seed(int(seed))
    sch = unclip_schedule(steps)
    x = torch.randn(b, d, generator=gen, dtype=torch.float32).to(dev)
    with torch.no_grad():
        cache = prior.prefix(P, Hb, Mb) if cached else None
        ts = sch.timesteps
        for i, t in enumerate(ts):
            xin = torch.cat([x, x]) if cfg else x
            tt = torch.tensor([t], device=dev, dtype=torch.long)
            if cached:
                pred = prior.step(xin.to(dt), tt, cache).float()
            else:
                pred = prior(xin.to(dt), tt, P, Hb, Mb).float()
            if cfg:
                un, co = pred.chunk(2)
                pred = un + guidance * (co - un)
            prev = ts[i + 1] if i + 1 < len(ts) else None
            x = _unclip_step(sch, pred, t, prev, x,
                             lambda: torch.randn(b, d, generator=gen, dtype=torch.float32).to(dev), clip_range)
            if callback is not None:
                callback(i + 1, len(ts))
    return denormalize(x, mean.to(dev), std.to(dev))
