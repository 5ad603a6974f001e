"""Tiny seeded diffusers components and an offline byte-level CLIP tokenizer."""
from __future__ import annotations

import torch


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable-character map, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def byte_tokenizer(max_length: int = 77):
    """CLIPTokenizer with the 512 base symbols and no merges (testing-offline.md §3)."""
    from transformers import CLIPTokenizer
    base = list(_bytes_to_unicode().values())
    vocab = {}
    for s in base:
        vocab[s] = len(vocab)
    for s in base:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_unet(seed: int = 0, cross_dim: int = 32, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=32,
        in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, norm_num_groups=32,
    ).eval()


def tiny_ledits_pipeline(seed: int = 0):
    """A LEdits++ pipeline over tiny components built in code (testing-offline.md §2, §5).

    DDIM with ``set_alpha_to_one=False`` and the ``add_noise`` long-cast workaround.
    Returns ``(pipe, uncond_embedding)``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, LEditsPPPipelineStableDiffusion
    from transformers import CLIPTextConfig, CLIPTextModel

    class LongAddNoiseDDIM(DDIMScheduler):
        """LEdits++ invert() passes a float timestep to add_noise (testing-offline.md §5)."""

        def add_noise(self, original_samples, noise, timesteps):
            return super().add_noise(original_samples, noise, timesteps.long())

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                                      num_attention_heads=4, vocab_size=len(tok), max_position_embeddings=77,
                                      bos_token_id=512, eos_token_id=513, pad_token_id=513)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32, sample_size=32).eval()
    sched = LongAddNoiseDDIM(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1)
    pipe = LEditsPPPipelineStableDiffusion(vae=vae, text_encoder=te, tokenizer=tok, unet=tiny_unet(seed),
                                           scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ids = tok([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        uncond = te(ids)[0]
    return pipe, uncond


def _one_thread_fixture():
    import pytest

    @pytest.fixture(autouse=True, scope="module")
    def one_thread():
        """Tiny tensors run much faster on one thread (and the CPU may be shared): import into a test module."""
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(old)

    return one_thread


one_thread = _one_thread_fixture()
