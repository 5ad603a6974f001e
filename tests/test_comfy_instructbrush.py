"""InstructBrush nodes inside a real ComfyUI (in-process), on the random-weight SD1.5 IP2P fixture.

Skipped (reason printed) when COMFYUI_DIR is unset. Random weights: these tests check wiring,
exactness, files and errors; quality is measured on the toy model (bench/instructbrush_toy.py).
"""
import os

import pytest
import torch
from comfy_harness import inprocess

inprocess.require("test_comfy_instructbrush")

import comfy.samplers
import comfy.sd
import folder_paths
from comfy_harness.ip2p_fixtures import cached_ip2p_checkpoint
from photoops.kernels import instructbrush as ib
from photoops.kernels.protocol import UnsupportedModelError
from photoops.nodes.comfy.attention import attach_attention_hooks, cross_attention_layers, cross_attention_widths
from photoops.nodes.comfy.files import folder_files, instruction_folder
from photoops.nodes.comfy.ip2p import ip2p_check
from photoops.nodes.comfy.text import count_prompt_tokens, encode_text
from photoops.nodes import instructbrush as nib
from tiny import one_thread  # noqa: F401

PROMPT = "make it blue"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    info = cached_ip2p_checkpoint()
    with torch.inference_mode():          # as ComfyUI's executor loads it: weights are inference tensors
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(info["path"], output_vae=True,
                                                                    output_clip=True, embedding_directory=None)
    out = tmp_path_factory.mktemp("out")
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    g = torch.Generator().manual_seed(0)
    before = torch.rand(2, 64, 64, 3, generator=g)
    after = torch.rand(2, 64, 64, 3, generator=g)
    yield {"model": model, "clip": clip, "vae": vae, "before": before, "after": after, "out": out}
    folder_paths.set_output_directory(old)


def _learn(env, name, steps=2, **kw):
    args = {"model": env["model"], "clip": env["clip"], "vae": env["vae"], "before": env["before"],
            "after": env["after"], "instruction": PROMPT, "name": name, "steps": steps, "lr": 1e-2, "seed": 0,
            "time_ranges": 2, "batch_size": 1, "loss_on_guided_prediction": False, "checkpoint_every": 0,
            "resume": True}
    args.update(kw)
    return nib.InstructionLearnNode.execute(**args)


def _edit(env, model, positive, seed=0, steps=2):
    """Core graph: InstructPixToPixConditioning -> DualCFGGuider -> SamplerCustomAdvanced (as the workflow),
    under inference mode as ComfyUI's executor runs it."""
    with torch.inference_mode():
        return _edit_inner(env, model, positive, seed, steps)


def _edit_inner(env, model, positive, seed, steps):
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    from comfy_extras.nodes_ip2p import InstructPixToPixConditioning

    empty = encode_text(env["clip"], "")
    pos, neg, lat = InstructPixToPixConditioning.execute(positive, empty, env["before"][:1], env["vae"]).result
    guider = Guider_DualCFG(model)
    guider.set_conds(pos, neg, empty)
    guider.set_cfg(7.5, 1.5)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()
    noise = torch.randn(lat["samples"].shape, generator=torch.Generator().manual_seed(seed))
    sampler = comfy.samplers.sampler_object("euler")
    return guider.sample(noise, lat["samples"], sampler, sigmas, disable_pbar=True, seed=seed)


def test_fixture_is_detected_as_ip2p(env):
    assert type(env["model"].model).__name__ == "SD15_instructpix2pix"
    ip2p_check(env["model"])
    assert len(cross_attention_widths(env["model"])) == len(cross_attention_layers(env["model"]))


def test_learn_saves_round_trips_and_leaves_model_untouched(env):
    model = env["model"]
    opts_before = repr(model.model_options)
    w0 = model.model.diffusion_model.input_blocks[0][0].weight.clone()
    inst, prompt = _learn(env, "rt").result[:2]
    assert prompt == PROMPT and inst.m == count_prompt_tokens(env["clip"], PROMPT)
    assert repr(model.model_options) == opts_before
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight, w0)
    moved = [not torch.equal(inst.gamma_k[str(o)], inst.k0[o][None].expand_as(inst.gamma_k[str(o)]))
             for o in inst.layers]
    assert any(moved)
    files = folder_files(nib.FOLDER)
    assert "rt.safetensors" in files
    loaded, p2 = nib.LoadInstructionNode.execute("rt.safetensors").result
    assert p2 == PROMPT
    for a, b in zip(inst.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert loaded.meta["settings"]["pairs"] == 2


def test_untrained_instruction_is_identity_and_strength_zero_is_plain(env):
    model, clip = env["model"], env["clip"]
    pos_plain = encode_text(clip, PROMPT)
    plain = _edit(env, model, pos_plain)
    # instruction at initialisation (gamma = frozen projections): output unchanged
    cap = ib.KVCapture(ib.prompt_positions(count_prompt_tokens(clip, PROMPT)))
    probe = attach_attention_hooks(model, nib.AttentionHooks([cap]))
    _edit(env, probe, pos_plain, steps=1)
    inst = ib.LearnedInstruction(PROMPT, cap.positions, cap.k, cap.v, time_ranges=2)
    patched, pos, _ = nib.InstructionApplyNode.execute(model, clip, inst, 1.0).result
    same = _edit(env, patched, pos)
    assert (same - plain).abs().max() < 1e-4
    with torch.no_grad():
        for p in inst.parameters():
            p.add_(0.5 * torch.randn_like(p))
    moved = _edit(env, nib.InstructionApplyNode.execute(model, clip, inst, 1.0).result[0], pos)
    assert (moved - plain).abs().max() > 1e-3
    zero = _edit(env, nib.InstructionApplyNode.execute(model, clip, inst, 0.0).result[0], pos)
    assert (zero - plain).abs().max() < 1e-4


def test_apply_patches_only_the_instruction_branch(env):
    model, clip = env["model"], env["clip"]
    inst, _ = _learn(env, "hits").result[:2]
    patched, ihook = nib._hooked(model, inst)
    pos = encode_text(clip, PROMPT)
    ihook.reset_counts()
    _edit(env, patched, pos, steps=1)
    n_layers = len(cross_attention_layers(model))
    # DualCFG runs 3 branches; only the one with the instruction text matches (one chunk per layer)
    assert ihook.hits == n_layers
    assert ihook.ranges_used


def test_interrupt_keeps_a_checkpoint_and_resume_matches(env, monkeypatch):
    full = _learn(env, "full", steps=4).result[0]
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(nib, "interrupt_check", stop)
    with pytest.raises(KeyboardInterrupt):
        _learn(env, "resumed", steps=4)
    partial = os.path.join(instruction_folder(), "resumed.partial")
    assert os.path.exists(partial)
    monkeypatch.setattr(nib, "interrupt_check", lambda: False)
    res = _learn(env, "resumed", steps=4).result[0]
    assert not os.path.exists(partial)
    for a, b in zip(full.parameters(), res.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_inputs(env):
    b, a = env["before"], env["after"]
    with pytest.raises(ValueError, match="2 before image.*1 after"):
        _learn(env, "bad", before=b, after=a[:1])
    with pytest.raises(ValueError, match="same size"):
        _learn(env, "bad", before=b, after=torch.rand(2, 32, 64, 3))
    with pytest.raises(ValueError, match="initial instruction is empty"):
        _learn(env, "bad", instruction="  ")
    assert not any(f.startswith("bad") for f in os.listdir(instruction_folder()))
    sd15, clip15, _, _ = inprocess.load_fixture()
    with pytest.raises(UnsupportedModelError, match="InstructPix2Pix"):
        _learn(env, "bad", model=sd15)
    inst, _ = _learn(env, "ok1", steps=1).result[:2]
    with pytest.raises(UnsupportedModelError, match="InstructPix2Pix"):
        nib.InstructionApplyNode.execute(sd15, clip15, inst, 1.0)
    inst.prompt = "make it much bluer now"          # a different P0: token count differs
    with pytest.raises(ValueError, match="tokens of the instruction"):
        nib.InstructionApplyNode.execute(env["model"], env["clip"], inst, 1.0)


def test_apply_warns_once_per_run_when_the_instruction_never_reached_the_model(env, caplog):
    model, clip = env["model"], env["clip"]
    inst, _ = _learn(env, "warn").result[:2]
    patched, pos, _ = nib.InstructionApplyNode.execute(model, clip, inst, 1.0).result
    with caplog.at_level("WARNING", logger="photoops.instructbrush"):
        _edit(env, patched, pos, steps=2)                            # the Apply conditioning: no warning
        assert not [r for r in caplog.records if "never applied" in r.getMessage()]
        _edit(env, patched, encode_text(clip, "a different prompt"), steps=2)
    warned = [r for r in caplog.records if "never applied" in r.getMessage()]
    assert len(warned) == 1 and repr(PROMPT) in warned[0].getMessage()
