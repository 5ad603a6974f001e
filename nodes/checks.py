"""Early checks: run a node's widget checks in ``validate_inputs``, before the queue runs.

ComfyUI calls a node's ``validate_inputs`` with its widget values when a prompt is queued and
shows a returned string on the node, so a bad value fails before any model loads.  Define it
with explicit keyword arguments defaulting to ``None`` (never ``**kwargs``: that would switch
off ComfyUI's own min/max checks of every other input); a linked input arrives as ``None``.
"""
from __future__ import annotations


def first_error(*checks) -> bool | str:
    """``True``, or the message of the first check (a callable) that raises ``ValueError``."""
    for check in checks:
        try:
            check()
        except ValueError as e:
            return str(e)
    return True


def given(*values) -> bool:
    """Whether every value is a widget value (not ``None``, i.e. not linked)."""
    return all(v is not None for v in values)


def refuse_flow(model, what: str, instead: str) -> None:
    """Raise ``UnsupportedModelError`` when ``model`` is a rectified-flow model (SD3 / SD3.5 / Flux): ``what`` is
    not defined there (says why), ``instead`` names the alternative.  The message names the model's family."""
    from ..kernels.protocol import UnsupportedModelError
    from .comfy.flow import family, is_flow

    if is_flow(model):
        raise UnsupportedModelError(f"{what}; this model is {family(model)}, a rectified-flow model (SD3 / SD3.5 / "
                                    f"Flux family): {instead}")
