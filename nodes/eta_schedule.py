"""Eta Schedule: eta(t) curves (and an optional region mask) for Invert's ``eta`` and ``ddpm`` methods.

The curves are ``kernels/eta.py``'s; ``web/eta_schedule.js`` draws the same curve on the node
(``tests/test_eta_js_parity.py`` checks the two agree).
"""
from __future__ import annotations

import re

from comfy_api.latest import io

from ..kernels import eta as keta
from .checks import first_error, given

ETA_SCHEDULE = io.Custom("PHOTOOPS_ETA_SCHEDULE")


_PRESET_NAMES = ["linear_default", "paper_A", "paper_B", "constant", "custom"]


def parse_points(text: str) -> list:
    """``"0:0, 0.6:0, 1:0.7"`` -> ``[(0, 0), (0.6, 0), (1, 0.7)]`` (u = t/999, eta)."""
    pts = []
    for part in re.split(r"[,;\n]+", text.strip()):
        if not part.strip():
            continue
        bits = part.replace("=", ":").split(":")
        if len(bits) != 2:
            raise ValueError(f"custom eta point {part.strip()!r} is not 'u:eta' (e.g. '0.6:0, 1:0.7')")
        try:
            pts.append((float(bits[0]), float(bits[1])))
        except ValueError:
            raise ValueError(f"custom eta point {part.strip()!r} is not two numbers") from None
    if not pts:
        raise ValueError("custom eta curve needs at least one 'u:eta' point")
    return pts


def build_schedule(preset: str, eta: float, points: str, power: float):
    if preset == "constant":
        return keta.custom_points([(0.0, eta)])
    if preset == "custom":
        return keta.custom_points(parse_points(points))
    if preset in ("paper_A", "paper_B", "linear_default"):
        f = keta.PRESETS[preset]
        return keta.eta_time_function(f.u1, f.y1, f.u2, f.y2, power) if power != 1.0 else f
    raise ValueError(f"unknown eta preset {preset!r}")


class EtaScheduleNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_EtaSchedule",
            display_name="Eta Schedule",
            category="PhotoOps/inversion",
            description="A time-dependent eta for Eta Inversion (and for DDPM inversion), optionally limited to a "
                        "region by a MASK: eta is 0 (pure DDIM, background kept) outside it.",
            inputs=[
                io.Combo.Input("preset", options=_PRESET_NAMES, default="linear_default",
                               tooltip="linear_default: 0 at t=0 -> 0.4 at t=999 (the Eta Inversion code's default). "
                                       "paper_A: 0 until u=0.6, then up to 0.7 (strong edits). paper_B: 0 until u=0.3, "
                                       "then up to 0.2 (subtle edits). constant: eta everywhere. custom: points."),
                io.Float.Input("eta", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="constant preset: eta at every step (0 = DDIM, 1 = DDPM)."),
                io.String.Input("points", default="0:0, 0.6:0, 1:0.7",
                                tooltip="custom preset: 'u:eta' pairs with u = t/999 (0 = clean end, 1 = noisiest); "
                                        "linear in between, constant outside."),
                io.Float.Input("power", default=1.0, min=0.05, max=10.0, step=0.05,
                               tooltip="paper presets: exponent of the ramp (1 = linear, as in the paper)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional region: eta applies inside (mask > 0.5), 0 outside."),
            ],
            outputs=[ETA_SCHEDULE.Output(display_name="eta_schedule", tooltip="Connect to Invert.")],
        )

    @classmethod
    def validate_inputs(cls, preset=None, eta=None, points=None, power=None):
        return first_error(lambda: build_schedule(preset, eta, points, power) if given(preset, eta, points, power)
                           else None)

    @classmethod
    def execute(cls, preset, eta, points, power, mask=None) -> io.NodeOutput:
        fn = build_schedule(preset, eta, points, power)
        return io.NodeOutput({"fn": fn, "mask": None if mask is None else mask.float().cpu(), "preset": preset})
