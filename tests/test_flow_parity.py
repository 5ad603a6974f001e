"""Adapter parity on rectified-flow DiTs (issue 19): the velocity our kernels see through ComfyUI equals diffusers'.

Our denoiser view is what ``Invert`` hands the flow kernels: a core CFGGuider run by
``nodes.comfy.sampling.run_with_guider`` returns ``D``, and the kernels take ``v = (x - D) / s``
(kernels/flow_inversion.py F1).  The reference is diffusers' ``SD3Transformer2DModel`` /
``FluxTransformer2DModel`` (0.42.1), written by neither us nor ComfyUI, loaded with the SAME
weights: the tiny fixture files of ``comfy_harness/flow_fixtures.py`` converted with ComfyUI's own
key maps (``comfy.utils.mmdit_to_diffusers`` / ``flux_to_diffusers``, which slice the fused qkv and
swap the final adaLN's scale/shift).  diffusers is called as its pipelines call it: SD3 at
``timestep = 1000 s``; Flux with packed 2x2 latents, ``timestep = s``, ``guidance = 3.5``, position
ids (0, row, col), text ids 0.

Tolerance: relative L2 error <= 2e-6 in float32 (different attention kernels and operation
order; ``v`` recovered from ``D`` loses ~1e-7 |x| / s).  Measured 2.7e-7 .. 3.3e-7 (both models).
Flux is checked at one sigma (each forward of the 404 M-parameter file costs ~1 s on a CPU).
"""
import pytest
import torch
from comfy_harness import inprocess
from einops import rearrange

inprocess.require("test_flow_parity")

import comfy.utils
from comfy_harness import flow_fixtures as ff
from photoops.kernels.flow_inversion import velocity
from photoops.nodes.comfy.sampling import run_with_guider

SIGMAS = (0.9, 0.5, 0.2)
TOL = 2e-6


def _ours(model, cond, x, sigmas=SIGMAS):
    """``{s: v}`` from our denoiser view (a core CFGGuider at cfg 1 inside run_with_guider)."""

    @torch.no_grad()
    def work(denoise, _x, _sig):
        out = {}
        for s in sigmas:
            xx = x.to(_x)
            out[s] = velocity(xx, denoise(xx, torch.full((x.shape[0],), s, dtype=torch.float32)), s).cpu()
        return out, _x

    res, _ = run_with_guider(model, cond, cond, 1.0, torch.zeros_like(x), torch.tensor([1.0, 0.5, 0.0]), work)
    return res


def _to_diffusers(comfy_sd: dict, key_map: dict) -> dict:
    """Apply a ComfyUI diffusers->comfy key map in reverse: diffusers key -> (sliced / transformed) comfy tensor."""
    out = {}
    for dk, src in key_map.items():
        if isinstance(src, str):
            if src in comfy_sd:
                out[dk] = comfy_sd[src]
        elif len(src) == 2:
            name, (dim, start, length) = src
            if name in comfy_sd:
                out[dk] = comfy_sd[name].narrow(dim, start, length)
        elif src[0] in comfy_sd:
            out[dk] = src[2](comfy_sd[src[0]])
    return out


def _load(cls, config: dict, sd: dict):
    with torch.device("meta"):
        m = cls(**config)
    missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return m.eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_sd3_velocity_matches_diffusers_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    model = ff.load_flow_model("sd3")
    csd = model.model.diffusion_model.state_dict()
    sd = _to_diffusers(csd, comfy.utils.mmdit_to_diffusers({"depth": ff.SD3_CONFIG["depth"]}))
    ref = _load(SD3Transformer2DModel, dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                            attention_head_dim=64, num_attention_heads=2, joint_attention_dim=4096,
                                            caption_projection_dim=128, pooled_projection_dim=2048, out_channels=16,
                                            pos_embed_max_size=32), sd)
    cond = ff.sd3_conditioning(7, tokens=6)
    x = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(8))
    ours = _ours(model, cond, x)
    for s in SIGMAS:
        with torch.no_grad():
            theirs = ref(hidden_states=x, encoder_hidden_states=cond[0][0], pooled_projections=cond[0][1]["pooled_output"],
                         timestep=torch.tensor([1000.0 * s])).sample
        assert _rel(ours[s], theirs) <= TOL, (s, _rel(ours[s], theirs))


def test_flux_velocity_matches_diffusers_flux_transformer():
    from diffusers import FluxTransformer2DModel

    model = ff.load_flow_model("flux")
    csd = model.model.diffusion_model.state_dict()
    sd = _to_diffusers(csd, comfy.utils.flux_to_diffusers(ff.FLUX_CONFIG))
    ref = _load(FluxTransformer2DModel, dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=0,
                                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                sd)
    cond = ff.flux_conditioning(7, tokens=6, guidance=3.5)
    x = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(8))
    ours = _ours(model, cond, x, sigmas=(0.7,))
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    packed = rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
    for s in (0.7,):
        with torch.no_grad():
            out = ref(hidden_states=packed, encoder_hidden_states=cond[0][0],
                      pooled_projections=cond[0][1]["pooled_output"], timestep=torch.tensor([s]),
                      img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(cond[0][0].shape[1], 3),
                      guidance=torch.tensor([3.5])).sample
        theirs = rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=2, pw=2)
        assert _rel(ours[s], theirs) <= TOL, (s, _rel(ours[s], theirs))


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
