"""Whether the code runs inside a `torch.compile` graph that inductor will lower.

Some blocks write an op differently there (a form inductor emits faster on CPU); exported graphs
are traced by the same compiler stack but keep the plain ops, so they are excluded here.
"""
from __future__ import annotations

import torch


def in_inductor_graph() -> bool:
    """True while `torch.compile` traces the code, False in eager mode and under `torch.export`."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()
