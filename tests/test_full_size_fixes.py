"""Regression tests (tiny fixtures, default CI) for what the full-size bench (issue 16, bench/full_size.py) found."""
import torch
from comfy_harness import inprocess

inprocess.require("test_full_size_fixes")

import comfy.sd
from comfy_harness import fixtures
from photoops.nodes.comfy.models import normal_weight_copies


def test_weight_stand_ins_alias_the_inference_weights_without_a_copy():
    """Training (Concept Learn, Instruction Learn) swaps ComfyUI's inference-mode weights for normal tensors; at
    full size a copy cost 3.4 GB (SD1.5 fp32 UNet) / 5.1 GB (SDXL bf16). The stand-ins must share the storage, let
    autograd through, and be swapped back on exit."""
    info = fixtures.cached_sd15_checkpoint()
    with torch.inference_mode():          # as ComfyUI's executor loads it
        model = comfy.sd.load_checkpoint_guess_config(str(info["path"]), output_vae=False, output_clip=False)[0]
    dm = model.model.diffusion_model
    before = {k: (v, v.data_ptr()) for k, v in dm.state_dict(keep_vars=True).items()}
    assert all(v.is_inference() for v, _ in before.values())
    conv = dm.input_blocks[0][0]
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn(1, 4, 8, 8, requires_grad=True)
        try:
            torch.nn.functional.conv2d(x, conv.weight, conv.bias).sum().backward()
            raised = False
        except RuntimeError:
            raised = True
        assert raised                       # why the stand-ins exist
        with normal_weight_copies(dm):
            now = dm.state_dict(keep_vars=True)
            for k, (orig, ptr) in before.items():
                assert not now[k].is_inference() and now[k].data_ptr() == ptr, k      # same bytes, no copy
            torch.nn.functional.conv2d(x, conv.weight, conv.bias).sum().backward()
            assert x.grad is not None and bool(torch.isfinite(x.grad).all())
            assert not conv.weight.requires_grad
    after = dm.state_dict(keep_vars=True)
    assert all(after[k] is orig for k, (orig, _) in before.items())               # the originals are back

