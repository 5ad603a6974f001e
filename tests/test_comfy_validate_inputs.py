"""Early checks (issue 14): widget values that need no model are refused in ``validate_inputs``
(which ComfyUI runs when a prompt is queued, before anything executes), with the same message the
node's execution would give; linked inputs (None) are not judged."""
import pytest

from comfy_harness import inprocess

inprocess.require("test_comfy_validate_inputs")

from photoops.nodes import attention_mask as nam  # noqa: E402
from photoops.nodes import concept_learn as ncl  # noqa: E402
from photoops.nodes import instructbrush as nib  # noqa: E402
from photoops.nodes import inversion as ninv  # noqa: E402
from photoops.nodes import pops as npops  # noqa: E402
from photoops.nodes import semantic_guide as nsg  # noqa: E402


@pytest.mark.parametrize("node, kwargs, message", [
    (nsg.EditConceptNode, dict(text="  "), "concept text is empty"),
    (nsg.EditConceptNode, dict(text="blue", scale=5.0, threshold=1.0, warmup=0), r"threshold must be in \[0, 1\)"),
    (ninv.EtaScheduleNode, dict(preset="custom", eta=0.4, points="0.6, 1:0.7", power=1.0), "is not 'u:eta'"),
    (ninv.EtaScheduleNode, dict(preset="custom", eta=0.4, points="", power=1.0), "at least one"),
    (ncl.ConceptLearnNode, dict(concept_names="cl_a, cl_b", init_words="dog"), "2 concept names but 1 init words"),
    (ncl.ConceptLearnNode, dict(concept_names="../x", init_words="dog"), "is not allowed"),
    (ncl.ConceptLearnNode, dict(resolution=500), "multiple of 8"),
    (ncl.ConceptLearnNode, dict(loss_region="everything"), "loss_region must be"),
    (nib.InstructionLearnNode, dict(instruction=" "), "initial instruction is empty"),
    (npops.PopsTextNode, dict(word=""), "word is empty"),
    (nam.AttentionCaptureNode, dict(start_percent=0.6, end_percent=0.2), "greater than start_percent"),
])
def test_bad_widget_values_are_refused_early(node, kwargs, message):
    import re

    got = node.validate_inputs(**kwargs)
    assert isinstance(got, str) and re.search(message, got), got


@pytest.mark.parametrize("node, kwargs", [
    (nsg.EditConceptNode, dict(text="blue", scale=5.0, threshold=0.9, warmup=0)),
    (ninv.EtaScheduleNode, dict(preset="custom", eta=0.4, points="0:0, 0.6:0, 1:0.7", power=1.0)),
    (ninv.EtaScheduleNode, dict(preset="linear_default", eta=0.4, points="", power=1.0)),
    (ncl.ConceptLearnNode, dict(concept_names="cl_a, cl_b", init_words="dog, room", resolution=512, steps=400,
                                learning_rate=5e-4, em_rounds=4, vectors_per_token=1, loss_region="union")),
    (nib.InstructionLearnNode, dict(instruction="make it blue")),
    (npops.PopsTextNode, dict(word="wooden")),
    (nam.AttentionCaptureNode, dict(start_percent=0.0, end_percent=1.0, word="cat")),
    (ncl.ConceptLearnNode, dict()),          # every input linked: nothing to check yet
])
def test_good_or_linked_values_pass(node, kwargs):
    assert node.validate_inputs(**kwargs) is True


def test_validate_inputs_never_takes_kwargs():
    """A **kwargs signature would make ComfyUI skip its own min/max checks of every input."""
    import inspect

    for node in (nsg.EditConceptNode, ninv.EtaScheduleNode, ncl.ConceptLearnNode, nib.InstructionLearnNode,
                 npops.PopsTextNode, nam.AttentionCaptureNode):
        assert inspect.getfullargspec(node.validate_inputs).varkw is None, node
