"""PhotoOps kernels: the methods in plain torch, importing no ``comfy``.

Modules: ``schedule`` (VP <-> sigma conversions), ``protocol`` (denoiser view, layer and
call descriptions), ``attention`` (cross-attention hook registry and recorders),
``tokens`` (word -> token positions), ``maps`` (masks and heat maps),
``diffusers_adapter`` (the protocol on diffusers models; imports diffusers lazily).
"""
