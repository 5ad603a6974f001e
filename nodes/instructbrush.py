"""InstructBrush nodes: learn an editing instruction from before/after pairs, apply it to new photos.

* **Instruction Learn** — optimises the instruction's keys/values in every cross-attention layer
  of an InstructPix2Pix model (kernels/instructbrush.py) on N before/after pairs and saves a
  LEARNED_INSTRUCTION file into ``output/photoops_instructions`` (loaders also list
  ``models/photoops_instructions``). Progress bar, interrupt (the last checkpoint is kept), periodic
  checkpoints and resume.
* **Instruction Apply** — a cloned MODEL whose conditional-branch K/V carry the learned instruction,
  plus the positive CONDITIONING of the initial instruction P0 (the rows it was learned on). Use it
  with core InstructPixToPixConditioning and DualCFGGuider (three-branch IP2P guidance), so editing
  a new photo is a normal ComfyUI graph.
* **Load Instruction** — reads a saved file.
"""
from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

from ..kernels import instructbrush as ib
from ..kernels.attention import AttentionHooks
from ..kernels.files import clean_name, content_hash
from .checks import refuse_flow
from .comfy.attention import attach_attention_hooks, cross_attention_layers, cross_attention_widths
from .comfy.files import folder_file_path, folder_files, instruction_folder, next_save_path
from .comfy.ip2p import ComfyIP2PEps, ip2p_check, ip2p_encode_pairs
from .comfy.models import fingerprint, normal_weight_copies, vp_schedule
from .comfy.sampling import interrupt_check, on_run_end, progress_bar
from .comfy.text import count_prompt_tokens, encode_text, text_condition

LEARNED_INSTRUCTION = io.Custom("PHOTOOPS_INSTRUCTION")
FOLDER = "photoops_instructions"
LOG = logging.getLogger("photoops.instructbrush")


def _refuse_flow(model, node: str) -> None:
    refuse_flow(model, f"{node} (InstructBrush) learns instruction keys/values of an InstructPix2Pix UNet's "
                       f"cross-attention", "for instruction-style edits use the FlowEdit Guider + Sampler (source and "
                       "target prompts) or Invert (flow_noise_maps) + Inversion Sampler with a Semantic Guide")


def _check_images(before: torch.Tensor, after: torch.Tensor) -> None:
    if before.shape[0] != after.shape[0]:
        raise ValueError(f"got {before.shape[0]} before image(s) but {after.shape[0]} after image(s): InstructBrush "
                         f"learns from pairs; give the same number of each, in matching order")
    if tuple(before.shape[1:3]) != tuple(after.shape[1:3]):
        raise ValueError(f"before images are {before.shape[2]}x{before.shape[1]} but after images are "
                         f"{after.shape[2]}x{after.shape[1]}: each pair must have the same size (resize them first)")
    if before.shape[1] < 8 or before.shape[2] < 8:
        raise ValueError(f"images of {before.shape[2]}x{before.shape[1]} are too small")


def _positions(clip, prompt: str) -> list:
    m = count_prompt_tokens(clip, prompt)
    if m == 0:
        raise ValueError("the initial instruction is empty: give a few words describing the edit (e.g. "
                         "'make it look like winter'); its tokens are the rows InstructBrush learns")
    if m > 75:
        raise ValueError(f"the initial instruction has {m} tokens; one 77-token chunk (75 words) is supported")
    return ib.prompt_positions(m)


def _hooked(model, inst, strength: float = 1.0):
    """Patched clone; the hook's counts are reset when a sampling run starts and checked when it ends
    (one logged warning if the instruction's conditioning never reached the model)."""
    hook = ib.InstructionHook(inst, strength=strength, schedule=vp_schedule(model))
    patched = attach_attention_hooks(model, AttentionHooks([hook]), on_run_start=hook.reset_counts)
    on_run_end(patched, hook.end_run)
    return patched, hook


class InstructionLearnNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        instruction_folder()
        return io.Schema(
            node_id="PhotoOps_InstructionLearn",
            display_name="Instruction Learn (InstructBrush)",
            category="PhotoOps/instructbrush",
            description="Learns an editing instruction from before/after photo pairs (InstructBrush): the keys and "
                        "values of the instruction's words in every cross-attention layer of an InstructPix2Pix "
                        f"model are optimised with the diffusion loss. Saved to output/{FOLDER}; apply it with "
                        "Instruction Apply.",
            inputs=[
                io.Model.Input("model", tooltip="An InstructPix2Pix model (e.g. instruct-pix2pix checkpoint); "
                                                "never changed."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, used to encode the initial instruction."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, used to encode the pairs."),
                io.Image.Input("before", tooltip="Photos before the edit (a batch of N; same order as 'after')."),
                io.Image.Input("after", tooltip="The same photos after the edit (N, same sizes as 'before')."),
                io.String.Input("instruction", default="make it look like this",
                                tooltip="Initial instruction P0: its words are the rows that are learned (keep "
                                        "it short and close to the edit; e.g. 'turn the apples into peaches')."),
                io.String.Input("name", default="instruction",
                                tooltip=f"File name (output/{FOLDER}/<name>.safetensors; a counter is added if "
                                        f"it exists)."),
                io.Int.Input("steps", default=1000, min=1, max=100000,
                             tooltip="Optimisation steps (VISII / spec default 1000)."),
                io.Float.Input("lr", default=1e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6,
                               tooltip="AdamW learning rate on the keys/values (spec default 1e-3)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the timestep order and the noise."),
                io.Int.Input("time_ranges", default=5, min=1, max=20,
                             tooltip="Time-aware instruction: independent keys/values per range of timesteps "
                                     "(paper: 5; 1 = off). More ranges fit more but need more pairs."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Pairs per step, each with its own timestep (1 = VISII)."),
                io.Boolean.Input("loss_on_guided_prediction", default=False,
                                 tooltip="VISII variant: the loss uses the guided 3-branch prediction (text 7.5, "
                                         "image 1.5) x4; three model calls per step."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000,
                             tooltip="Write a resumable checkpoint every N steps (0 = only on interrupt)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from this name's checkpoint if one exists with the same "
                                         "settings and pairs."),
            ],
            outputs=[
                LEARNED_INSTRUCTION.Output(display_name="instruction", tooltip="To Instruction Apply."),
                io.String.Output(display_name="prompt", tooltip="The initial instruction P0 it was learned on."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, instruction=None):
        if instruction is not None and not str(instruction).strip():
            return ("the initial instruction is empty: give a few words describing the edit (e.g. 'make it look like "
                    "winter'); its tokens are the rows InstructBrush learns")
        return True

    @classmethod
    def execute(cls, model, clip, vae, before, after, instruction, name, steps, lr, seed, time_ranges, batch_size,
                loss_on_guided_prediction, checkpoint_every, resume) -> io.NodeOutput:
        _refuse_flow(model, "Instruction Learn")
        ip2p_check(model)
        _check_images(before, after)
        prompt = instruction.strip()
        positions = _positions(clip, prompt)
        folder = instruction_folder()
        os.makedirs(folder, exist_ok=True)
        name = clean_name(name, "instruction")
        partial = os.path.join(folder, f"{name}.partial")

        c_img, z0 = ip2p_encode_pairs(model, vae, before, after)
        cond, uncond = text_condition(clip, prompt), text_condition(clip, "")
        settings = {"steps": int(steps), "lr": float(lr), "seed": int(seed), "time_ranges": int(time_ranges),
                    "batch_size": int(batch_size), "guided": bool(loss_on_guided_prediction),
                    "pairs": int(before.shape[0]), "size": list(before.shape[1:3]),
                    "pairs_hash": content_hash(before.float(), after.float(), length=16, stride_to=65536), "model": fingerprint(model)}

        with torch.inference_mode(False), torch.enable_grad():
            c_img, z0 = c_img.clone(), z0.clone()        # normal tensors (not inference-mode ones)
            cond, uncond = cond.clone(), uncond.clone()
            # frozen projections of P0's tokens (one forward with a capture hook)
            cap = ib.KVCapture(positions)
            probe = attach_attention_hooks(model, AttentionHooks([cap]))
            with torch.no_grad():
                ComfyIP2PEps(probe, cond, uncond)(z0[:1], torch.tensor([500], device=z0.device), c_img[:1], True)
            if len(cap.k) != len(cross_attention_layers(model)):
                raise RuntimeError("the capture did not see every cross-attention layer")
            inst = ib.LearnedInstruction(prompt, positions, cap.k, cap.v, time_ranges=time_ranges,
                                         num_train_timesteps=vp_schedule(model).num_train_timesteps,
                                         meta={"settings": settings})
            start, opt_state = 0, None
            if resume and os.path.exists(partial):
                try:
                    start, opt_state = ib.load_checkpoint(partial, inst, settings)
                except ib.CheckpointMismatch as e:
                    LOG.warning("InstructBrush: %s; starting afresh", e)
            patched, _ = _hooked(model, inst)
            predict = ComfyIP2PEps(patched, cond, uncond)     # loads the model onto its device
            # ComfyUI loads weights under inference_mode; autograd needs normal copies (restored after)
            weights = normal_weight_copies(patched.model.diffusion_model)
            weights.__enter__()
            pbar = progress_bar(steps)
            pbar.update_absolute(start, steps)
            state = {"step": start}

            def callback(step, loss, instr):
                state["step"] = step
                pbar.update_absolute(step, steps)
                if checkpoint_every and step % checkpoint_every == 0 and step < steps:
                    ib.save_checkpoint(partial, instr, settings, step)
                interrupt_check()

            try:
                res = ib.learn(inst, predict, c_img, z0, vp_schedule(model).alphas_cumprod.float(),
                               steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                               loss_on_guided_prediction=loss_on_guided_prediction, callback=callback,
                               start_step=start, optimizer_state=opt_state)
            except BaseException:
                if state["step"] > start:
                    ib.save_checkpoint(partial, inst, settings, state["step"])
                    LOG.warning("InstructBrush: stopped at step %d; resumable checkpoint %s", state["step"], partial)
                raise
            finally:
                weights.__exit__(None, None, None)
        inst.meta.update(losses_first=res.losses[:5], losses_last=res.losses[-5:], steps_done=res.steps_done)
        path = next_save_path(folder, name, "instruction", plain_first=True)
        inst.save(path)
        if os.path.exists(partial):
            os.remove(partial)
        return io.NodeOutput(inst, prompt, ui={"text": [os.path.basename(path)]})


class InstructionApplyNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_InstructionApply",
            display_name="Instruction Apply (InstructBrush)",
            category="PhotoOps/instructbrush",
            description="Patches a clone of the InstructPix2Pix MODEL with a learned instruction (its keys/values in "
                        "every cross-attention layer, for the conditioning of the initial instruction only) and "
                        "returns that conditioning. Then: InstructPixToPixConditioning -> DualCFGGuider -> "
                        "SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The InstructPix2Pix model the instruction was learned on (cloned)."),
                io.Clip.Input("clip", tooltip="Its CLIP: encodes the initial instruction into the positive "
                                              "conditioning."),
                LEARNED_INSTRUCTION.Input("instruction", tooltip="From Instruction Learn or Load Instruction."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=3.0, step=0.05,
                               tooltip="Blend from the plain initial instruction (0) to the learned one (1); "
                                       "above 1 extrapolates."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Patched clone; use it in DualCFGGuider."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The initial instruction, encoded: give it (and an empty-prompt "
                                               "negative) to InstructPixToPixConditioning."),
                io.String.Output(display_name="prompt", tooltip="The initial instruction P0."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, instruction, strength) -> io.NodeOutput:
        _refuse_flow(model, "Instruction Apply")
        ip2p_check(model)
        instruction.check_layers(cross_attention_widths(model))
        m = count_prompt_tokens(clip, instruction.prompt)
        if m != instruction.m:
            raise ValueError(f"this CLIP makes {m} tokens of the instruction {instruction.prompt!r}, but it was "
                             f"learned with {instruction.m}: use the CLIP of the model it was learned on")
        patched, _ = _hooked(model, instruction, strength)
        return io.NodeOutput(patched, encode_text(clip, instruction.prompt), instruction.prompt)


class LoadInstructionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        instruction_folder()
        return io.Schema(
            node_id="PhotoOps_LoadInstruction",
            display_name="Load Instruction (InstructBrush)",
            category="PhotoOps/instructbrush",
            description=f"Loads a learned instruction from output/{FOLDER} or models/{FOLDER}.",
            inputs=[io.Combo.Input("instruction_file", options=folder_files(FOLDER),
                                   tooltip="A .safetensors file written by Instruction Learn.")],
            outputs=[LEARNED_INSTRUCTION.Output(display_name="instruction", tooltip="To Instruction Apply."),
                     io.String.Output(display_name="prompt", tooltip="Its initial instruction P0.")],
        )

    @classmethod
    def execute(cls, instruction_file) -> io.NodeOutput:
        inst = ib.LearnedInstruction.load(folder_file_path(FOLDER, instruction_file))
        return io.NodeOutput(inst, inst.prompt)


NODES = [InstructionLearnNode, InstructionApplyNode, LoadInstructionNode]
