"""torchgraft.tools"""
# inspection (summary.py, flops.py, memory.py)
from torchgraft.tools.flops import flops_report, measure_flops  # noqa: E402,F401
from torchgraft.tools.memory import estimate_memory, measure_peak_memory  # noqa: E402,F401
from torchgraft.tools.summary import inspect_model, summary  # noqa: E402,F401
