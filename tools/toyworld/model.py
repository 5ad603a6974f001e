"""The toy text-conditioned diffusion model, in diffusers format, built entirely offline.

Components (see ``build_model``):

* ``tokenizer``: a ``CLIPTokenizer`` built in code (testing-offline.md section 3): the 512
  byte symbols, then one merge per step of a word-level merge chain so that every toy word
  is exactly one id, then ``<|startoftext|>`` / ``<|endoftext|>``. ``model_max_length`` 16.
* ``text_encoder``: a small ``CLIPTextModel`` (2 layers, hidden 64), trained jointly.
* ``unet``: ``UNet2DConditionModel`` in plain pixel space (3 channels, 32x32), levels
  32/16/8 px with channels 16/32/64, cross-attention at 16 and 8 px. Unlike the 7.6 attempt,
  an attention-pooled text embedding is added to the time embedding
  (``addition_embed_type="text"``; it needs only ``encoder_hidden_states``, so unmodified
  pipelines drive it) and the res blocks use FiLM (``resnet_time_scale_shift="scale_shift"``),
  so every residual block sees the caption.
* ``vae``: ``IdentityVAE``, a parameter-free ``AutoencoderKL`` subclass (latent = image,
  3 channels, scaling factor 1, vae_scale_factor 1) so diffusers pipelines accept the model.
* ``scheduler``: ``DDIMScheduler``, epsilon prediction, ``squaredcos_cap_v2``, 1000 steps,
  ``set_alpha_to_one=False`` and ``clip_sample=False`` (exact inversion, testing-offline.md
  section 6).

Directory layout written by ``save_model`` (JSON + safetensors only, no pickles)::

    toy_info.json
    tokenizer/vocab.json, tokenizer/merges.json, tokenizer/merges.txt, tokenizer/tokenizer_config.json
    text_encoder/config.json, text_encoder/model.safetensors
    unet/config.json, unet/diffusion_pytorch_model.safetensors
    vae/config.json
    scheduler/scheduler_config.json

``UNet2DConditionModel.from_pretrained(dir + "/unet")``, ``CLIPTextModel.from_pretrained(dir +
"/text_encoder")`` and ``CLIPTokenizer.from_pretrained(dir + "/tokenizer")`` also work on it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .world import BG_COLOURS, FG_COLOURS, IMAGE_SIZE, SHAPES

EXTRA_WORDS = ("a", "on", "background", "and", "photo", "of")
WORDS = FG_COLOURS + SHAPES + BG_COLOURS + EXTRA_WORDS
MAX_LENGTH = 16
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=64,
)

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers' misnomer: this is the number of heads
    norm_num_groups=8,
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
    resnet_time_scale_shift="scale_shift",
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> list[str]:
    """The 256 byte stand-in characters in CLIP / GPT-2 order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in bs]
    n = 0
    for b in range(256):
        if b not in bs:
            chars.append(chr(256 + n))
            n += 1
    return chars


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the lowest-ranked adjacent pair (all occurrences, left to right)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), (a, b)) for a, b in zip(symbols, symbols[1:])]
        pairs = [p for p in pairs if p[0] is not None]
        if not pairs:
            break
        _, (a, b) = min(pairs)
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def toy_merges(words=WORDS) -> list[tuple[str, str]]:
    """Merges that make every word in ``words`` a single ``word</w>`` token.

    Words are processed in order; for each, the current BPE segmentation is computed and the
    leftmost remaining pair is appended as a new (lowest-priority) merge until one symbol is
    left. Appending never changes the segmentation of words already done (their merges all
    rank higher), so the result is exact by construction (and checked by the tests).
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        while True:
            seg = _bpe(symbols, ranks)
            if len(seg) == 1:
                break
            pair = (seg[0], seg[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def toy_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    base = _bytes_to_unicode()
    tokens = base + [c + "</w>" for c in base] + [a + b for a, b in merges] + [BOS, EOS]
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate token in toy vocabulary")
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(vocab: dict[str, int] | None = None, merges: list | None = None) -> CLIPTokenizer:
    """Offline ``CLIPTokenizer`` with one id per toy word (no files, no hub)."""
    if merges is None:
        merges = toy_merges()
    merges = [tuple(m) for m in merges]  # must be 2-tuples (strings "a b" raise in tokenizers)
    if vocab is None:
        vocab = toy_vocab(merges)
    return CLIPTokenizer(vocab=dict(vocab), merges=merges, model_max_length=MAX_LENGTH)


def word_ids(tokenizer: CLIPTokenizer, words=WORDS) -> dict[str, list[int]]:
    """Ids of each word without BOS/EOS (each list should have length 1)."""
    return {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in words}


# --------------------------------------------------------------------------- identity VAE


class IdentityVAE(AutoencoderKL):
    """Parameter-free stand-in for ``AutoencoderKL``: latent == image (3 channels, same size).

    ``encode(x).latent_dist`` is a deterministic ``DiagonalGaussianDistribution`` (mode ==
    sample == x), ``decode(z).sample == z``. ``block_out_channels=(3,)`` gives pipelines a
    ``vae_scale_factor`` of 1, ``scaling_factor=1`` keeps latents in [-1, 1].
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 3,
        block_out_channels: tuple[int] = (3,),
        sample_size: int = IMAGE_SIZE,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        latents_mean: tuple[float] | None = None,
        latents_std: tuple[float] | None = None,
        force_upcast: bool = False,
    ):
        ModelMixin.__init__(self)  # deliberately skip AutoencoderKL.__init__: no encoder/decoder
        self.use_slicing = False
        self.use_tiling = False
        # an empty, non-persistent buffer so that .dtype / .device / .to() behave
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        params = torch.cat([x, torch.zeros_like(x)], dim=1)
        posterior = DiagonalGaussianDistribution(params, deterministic=True)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def _decode(self, z: torch.Tensor, return_dict: bool = True):
        if not return_dict:
            return (z,)
        return DecoderOutput(sample=z)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        return self._decode(z, return_dict=return_dict)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True, generator=None):
        return self.decode(sample, return_dict=return_dict)


# --------------------------------------------------------------------------- builders


def build_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    torch.manual_seed(seed)  # transformers' initialisers use the global RNG
    return CLIPTextModel(cfg).eval()


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)


@dataclass
class ToyModel:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: IdentityVAE
    scheduler: DDIMScheduler

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``last_hidden_state`` [B, 16, 64], as diffusers pipelines compute ``prompt_embeds``."""
        return self.text_encoder(self.tokenize(prompts))[0]

    def parameters(self):
        yield from self.text_encoder.parameters()
        yield from self.unet.parameters()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def pipeline(self, cls=None, **kwargs):
        """Assemble a diffusers pipeline (default ``StableDiffusionPipeline``) around the model."""
        if cls is None:
            from diffusers import StableDiffusionPipeline as cls  # noqa: N813
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        extra.update(kwargs)
        return cls(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            **extra,
        )


def build_model(seed: int = 0) -> ToyModel:
    """A freshly initialised (untrained) toy model; deterministic under ``seed``."""
    tok = build_tokenizer()
    return ToyModel(
        tokenizer=tok,
        text_encoder=build_text_encoder(tok, seed=seed),
        unet=build_unet(seed=seed + 1),
        vae=IdentityVAE(),
        scheduler=build_scheduler(),
    )


# --------------------------------------------------------------------------- save / load


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def save_model(model: ToyModel, directory: str, dtype: torch.dtype | None = None, info: dict | None = None) -> None:
    """Write the model in diffusers layout (JSON configs + safetensors, no pickles).

    ``dtype`` (e.g. ``torch.float16``) casts the saved weights; the default keeps them as they are.
    """
    os.makedirs(directory, exist_ok=True)
    # tokenizer: our own JSON, plus the standard files so CLIPTokenizer.from_pretrained works
    tdir = os.path.join(directory, "tokenizer")
    os.makedirs(tdir, exist_ok=True)
    merges = [list(m) for m in toy_merges()]
    vocab = model.tokenizer.get_vocab()
    _write_json(os.path.join(tdir, "vocab.json"), dict(sorted(vocab.items(), key=lambda kv: kv[1])))
    _write_json(os.path.join(tdir, "merges.json"), merges)
    with open(os.path.join(tdir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    _write_json(
        os.path.join(tdir, "tokenizer_config.json"),
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MAX_LENGTH,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": EOS,
            "pad_token": EOS,
        },
    )

    # text encoder
    edir = os.path.join(directory, "text_encoder")
    os.makedirs(edir, exist_ok=True)
    _write_json(os.path.join(edir, "config.json"), model.text_encoder.config.to_dict())
    sd = {k: v.detach().contiguous() for k, v in model.text_encoder.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, os.path.join(edir, "model.safetensors"), metadata={"format": "pt"})

    # unet
    udir = os.path.join(directory, "unet")
    os.makedirs(udir, exist_ok=True)
    _write_json(os.path.join(udir, "config.json"), dict(model.unet.config))
    sd = {k: v.detach().contiguous() for k, v in model.unet.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, os.path.join(udir, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    # vae and scheduler: configs only
    vdir = os.path.join(directory, "vae")
    os.makedirs(vdir, exist_ok=True)
    _write_json(os.path.join(vdir, "config.json"), {**dict(model.vae.config), "_class_name": "IdentityVAE"})
    sdir = os.path.join(directory, "scheduler")
    os.makedirs(sdir, exist_ok=True)
    _write_json(os.path.join(sdir, "scheduler_config.json"), dict(model.scheduler.config))

    _write_json(
        os.path.join(directory, "toy_info.json"),
        {
            "format": "photoops-toyworld-v1",
            "words": list(WORDS),
            "caption_template": "a {fg} {shape} on a {bg} background",
            "image_size": IMAGE_SIZE,
            "value_range": [-1, 1],
            **(info or {}),
        },
    )


def _clean_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def load_model(directory: str, dtype: torch.dtype = torch.float32) -> ToyModel:
    """Load a model written by ``save_model`` (offline; never touches a hub).

    The scheduler is a ``DDIMScheduler``, or a ``FlowMatchEulerDiscreteScheduler`` for the toy
    rectified-flow model (``flow.py``; recognised by its config's ``shift`` key).
    """
    with open(os.path.join(directory, "tokenizer", "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(directory, "tokenizer", "merges.json"), encoding="utf-8") as f:
        merges = [tuple(m) for m in json.load(f)]
    tok = build_tokenizer(vocab=vocab, merges=merges)

    with open(os.path.join(directory, "text_encoder", "config.json"), encoding="utf-8") as f:
        tcfg = json.load(f)
    te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in tcfg.items() if k not in ("transformers_version",)}))
    te.load_state_dict({k: v.float() for k, v in load_file(os.path.join(directory, "text_encoder", "model.safetensors")).items()})

    with open(os.path.join(directory, "unet", "config.json"), encoding="utf-8") as f:
        ucfg = json.load(f)
    unet = UNet2DConditionModel.from_config(_clean_config(ucfg))
    unet.load_state_dict(
        {k: v.float() for k, v in load_file(os.path.join(directory, "unet", "diffusion_pytorch_model.safetensors")).items()}
    )

    with open(os.path.join(directory, "vae", "config.json"), encoding="utf-8") as f:
        vae = IdentityVAE.from_config(_clean_config(json.load(f)))
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        scfg = _clean_config(json.load(f))
    if "shift" in scfg and "beta_schedule" not in scfg:   # the toy rectified-flow model (flow.py)
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(scfg)
    else:
        sched = DDIMScheduler.from_config(scfg)
    if dtype != torch.float32:
        te, unet, vae = te.to(dtype), unet.to(dtype), vae.to(dtype)
    return ToyModel(tok, te.eval(), unet.eval(), vae, sched)
