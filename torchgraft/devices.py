"""Device names checked up front: a known type, available on this machine, an index that exists."""
from __future__ import annotations

from torchgraft.errors import ConfigError

_KINDS = ("cpu", "cuda", "mps")


def check_device(name: str, key: str = "--device", allow_auto: bool = True) -> str:
    """Return `name` if it names a usable device ("auto" included when `allow_auto`), else one
    ConfigError line naming `key`, the value and what to use instead."""
    if name == "cpu" or (allow_auto and name == "auto"):
        return name  # always usable; no need to import torch to know
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={name!r} is not a device; use cpu, cuda, cuda:N or mps"
                          + (" (or auto)" if allow_auto else "")) from None
    if dev.type not in _KINDS:
        raise ConfigError(f"{key}={name!r}: torchgraft runs on {', '.join(_KINDS)}, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name!r} but CUDA is not available on this machine (no GPU or a "
                              "CPU-only torch); use cpu" + (" or auto" if allow_auto else ""))
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{key}={name!r} but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={name!r} but MPS is not available on this machine; use cpu")
    return name
