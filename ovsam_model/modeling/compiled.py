"""Opt-in `torch.compile` of OVSAM's image side, for CUDA (`ovsam label --compile`).

The CLIP trunk and the SAM2CLIP adapter run once per image at the full input size and take most
of a batch's time; they are compiled in place (`nn.Module.compile`), so that the modules, their
attribute names and state-dict keys stay as they are. Only their forward (`__call__`) is
compiled: the text tower (`ClipTrunk.encode_text`) and the RoI head keep running eagerly. The
first batch pays the compilation.
"""

from __future__ import annotations

from .ovsam import OVSAM

COMPILED = ("trunk", "adapter")  # the OVSAM submodules that `compile_image_side` compiles


def compile_image_side(model: OVSAM) -> list[str]:
    """Compile `model.trunk` and `model.adapter` in place; returns their names."""
    for name in COMPILED:
        getattr(model, name).compile()
    return list(COMPILED)
