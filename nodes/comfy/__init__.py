"""Where PhotoOps touches ComfyUI: one module per subject (every ``comfy.*`` call lives here).

| module | what of ComfyUI it touches |
|---|---|
| ``models`` | ModelPatcher, ``model_sampling``, model family / prediction type, fingerprints, device placement, weight copies for training |
| ``attention`` | ``transformer_options`` attn2 replace patches, the UNet's cross-attention layer list |
| ``text`` | CLIP tokenizers and text encoders |
| ``sampling`` | guiders, KSAMPLER, progress bar, progress text, interrupt, sampling-run callbacks |
| ``files`` | ``folder_paths``: model / output folders, file lists, the embeddings folder, numbered save paths |
| ``concepts`` | differentiable CLIP encoding with spliced concept rows, embedding files (Concept Learn) |
| ``training`` | the graph-keeping denoiser over ``BaseModel.apply_model``, VAE encoding into model space |
| ``pops`` | CLIP vision outputs, unCLIP / ADM consumers, dtype choice (pOps) |
| ``ip2p`` | InstructPix2Pix model checks and its eps prediction (InstructBrush) |
| ``prompt_to_prompt`` | Prompt-to-Prompt control on attn1 / attn2 patches and its batched source / target guider |
| ``flow`` | rectified-flow (``CONST``) models: family checks, flow sigmas and fingerprints, flow inversion / replay, the FlowEdit guider and sampler |
| ``flow_attention`` | ``dit`` double / single block replace patches, ``optimized_attention_override``, an APPLY_MODEL wrapper: joint-attention capture (SD3 / Flux) |

Import graph (acyclic): ``models`` <- ``attention``, ``training``, ``ip2p``; ``text`` <- ``concepts``;
``sampling`` <- ``flow``; ``flow``, ``text`` <- ``flow_attention``; ``attention``, ``sampling``, ``text`` <- ``prompt_to_prompt``; ``files``, ``sampling`` and
``pops`` stand alone.  ``kernels/`` imports none of them.
"""
