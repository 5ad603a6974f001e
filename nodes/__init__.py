"""PhotoOps nodes (ComfyUI V3).  Only imported inside ComfyUI."""
from comfy_api.latest import ComfyExtension

from . import attention_mask, inversion, pops, semantic_guide
from . import concept_learn
from . import instructbrush
from . import prompt_to_prompt
from . import flowedit


class PhotoOpsExtension(ComfyExtension):
    async def get_node_list(self):
        return [*attention_mask.NODES, *inversion.NODES, *semantic_guide.NODES, *concept_learn.NODES, *pops.NODES,
                *instructbrush.NODES, *prompt_to_prompt.NODES, *flowedit.NODES]
