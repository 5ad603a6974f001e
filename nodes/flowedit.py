"""FlowEdit (Kulikov et al.): inversion-free editing on SD3 / SD3.5 / Flux, as a GUIDER + SAMPLER pair.

Wire **FlowEdit Guider** (source and target prompts) and **FlowEdit Sampler** into core
``SamplerCustomAdvanced`` with **Disable Noise**, the model's SIGMAS (BasicScheduler) and the
photo's latent.  The maths is in ``kernels/flowedit.py``; the ComfyUI side in ``nodes/comfy/flow.py``.
"""
from __future__ import annotations

from comfy_api.latest import io

from .comfy.flow import FlowEditGuider, flowedit_sampler
from .comfy.sampling import ksampler


class FlowEditGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_FlowEditGuider",
            display_name="FlowEdit Guider",
            category="PhotoOps/flow",
            description="The source and target prompts of a FlowEdit edit (SD3 / SD3.5 / Flux). Use with FlowEdit "
                        "Sampler in SamplerCustomAdvanced; with another sampler it guides with the target prompt.",
            inputs=[
                io.Model.Input("model", tooltip="An SD3 / SD3.5 / Flux model (rectified flow); cloned, never changed."),
                io.Conditioning.Input("source_positive", tooltip="Prompt describing the photo as it is."),
                io.Conditioning.Input("source_negative", tooltip="Negative prompt of the source branch (used when "
                                                                 "source_cfg != 1)."),
                io.Float.Input("source_cfg", default=3.5, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of the source branch (SD3 paper setting 3.5). Flux-dev: 1, and put "
                                       "FluxGuidance 1.5 on the source prompt."),
                io.Conditioning.Input("target_positive", tooltip="Prompt describing the edited photo."),
                io.Conditioning.Input("target_negative", tooltip="Negative prompt of the target branch."),
                io.Float.Input("target_cfg", default=13.5, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of the target branch (SD3 paper setting 13.5). Flux-dev: 1, and put "
                                       "FluxGuidance 5.5 on the target prompt."),
            ],
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="Connect to SamplerCustomAdvanced with the "
                                                                     "FlowEdit Sampler.")],
        )

    @classmethod
    def execute(cls, model, source_positive, source_negative, source_cfg, target_positive, target_negative,
                target_cfg) -> io.NodeOutput:
        return io.NodeOutput(FlowEditGuider(model, source_positive, source_negative, source_cfg, target_positive,
                                            target_negative, target_cfg))


class FlowEditSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_FlowEditSampler",
            display_name="FlowEdit Sampler",
            category="PhotoOps/flow",
            description="FlowEdit: moves the photo along the difference of the target and source velocities, no "
                        "inversion. Needs the FlowEdit Guider, Disable Noise and the photo's latent.",
            inputs=[
                io.Int.Input("n_max", default=24, min=0, max=1000,
                             tooltip="Edit during the last n_max steps (the first steps - n_max are skipped): more = a "
                                     "stronger edit, less of the photo's structure. Paper: 24 of 28 (Flux), 33 of 50 "
                                     "(SD3). Must not exceed the steps of the SIGMAS."),
                io.Int.Input("n_min", default=0, min=0, max=1000,
                             tooltip="The last n_min steps sample the target prompt alone from the edited latent "
                                     "(SDEdit-like refinement); 0 = none (paper)."),
                io.Int.Input("n_avg", default=1, min=1, max=64,
                             tooltip="Noise draws averaged per step (each costs two model calls; paper: 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of FlowEdit's per-step noise."),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, n_max, n_min, n_avg, seed) -> io.NodeOutput:
        if n_min > n_max:
            raise ValueError(f"n_min ({n_min}) must not exceed n_max ({n_max})")
        return io.NodeOutput(ksampler(flowedit_sampler, n_max=int(n_max), n_min=int(n_min), n_avg=int(n_avg),
                                      seed=int(seed)))


NODES = [FlowEditGuiderNode, FlowEditSamplerNode]
