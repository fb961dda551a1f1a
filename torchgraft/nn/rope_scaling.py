"""RoPE frequency scalings, computed as `transformers.modeling_rope_utils` computes them.

Each scaling is an object `RotaryEmbedding` delegates to:
- `inv_freq(base, dim, device) -> (dim/2,) float32`: the frequencies at build time;
- `attention_factor`: multiplies cos/sin (YaRN, LongRoPE; 1.0 otherwise);
- `at_length(inv_freq, base, dim, seq_len) -> inv_freq`: the frequencies for a forward whose largest
  position is `seq_len - 1` (a tensor), for the scalings that depend on it (dynamic NTK, LongRoPE);
  the others return `inv_freq` unchanged.

HF names (`rope_type`): "linear", "dynamic", "llama3", "yarn", "longrope".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def default_inv_freq(base: float, dim: int, device=None) -> torch.Tensor:
    """`1 / base**(2i/dim)`, i < dim/2 (plain RoPE)."""
    idx = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float()
    return 1.0 / (base ** (idx / dim))


class RopeScaling:
    """Plain RoPE; the base of the variants below."""

    rope_type = "default"
    attention_factor = 1.0
    length_dependent = False  # True when `at_length` changes the frequencies

    def inv_freq(self, base: float, dim: int, device=None) -> torch.Tensor:
        return default_inv_freq(base, dim, device)

    def at_length(self, inv_freq: torch.Tensor, base: float, dim: int, seq_len: torch.Tensor) -> torch.Tensor:
        return inv_freq


@dataclass(frozen=True)
class LinearScaling(RopeScaling):
    """Position interpolation: every frequency divided by `factor`."""
    factor: float
    rope_type = "linear"

    def inv_freq(self, base: float, dim: int, device=None) -> torch.Tensor:
        return default_inv_freq(base, dim, device) / self.factor


@dataclass(frozen=True)
class DynamicNTKScaling(RopeScaling):
    """Dynamic NTK: past `max_position_embeddings` the base grows with the sequence length."""
    factor: float
    max_position_embeddings: int
    rope_type = "dynamic"
    length_dependent = True

    def inv_freq(self, base: float, dim: int, device=None) -> torch.Tensor:
        return default_inv_freq(base, dim, device)

    def at_length(self, inv_freq: torch.Tensor, base: float, dim: int, seq_len: torch.Tensor) -> torch.Tensor:
        orig = self.max_position_embeddings
        seq = torch.clamp(seq_len.float(), min=orig)
        grown = base * ((self.factor * seq / orig) - (self.factor - 1)) ** (dim / (dim - 2))
        idx = torch.arange(0, dim, 2, dtype=torch.int64, device=inv_freq.device).float() / dim
        return torch.where(seq_len > orig, 1.0 / (grown ** idx), inv_freq)


@dataclass(frozen=True)
class Llama3Scaling(RopeScaling):
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, the band between smoothed."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type = "llama3"

    def inv_freq(self, base: float, dim: int, device=None) -> torch.Tensor:
        inv_freq = default_inv_freq(base, dim, device)
        old = self.original_max_position_embeddings
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class YarnScaling(RopeScaling):
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between, and cos/sin
    scaled by `attention_factor` (default from `factor`, `mscale`, `mscale_all_dim`)."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    given_attention_factor: float | None = None
    truncate: bool = True
    rope_type = "yarn"

    @property
    def attention_factor(self) -> float:  # type: ignore[override]
        if self.given_attention_factor is not None:
            return self.given_attention_factor
        if self.mscale and self.mscale_all_dim:
            return float(_yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim))
        return _yarn_mscale(self.factor)

    def inv_freq(self, base: float, dim: int, device=None) -> torch.Tensor:
        orig = self.original_max_position_embeddings

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp
        pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (self.factor * pos_freqs)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 = extrapolate (high frequencies), 0 = interpolate
        return interpolation * (1 - keep) + extrapolation * keep


@dataclass(frozen=True)
class LongRopeScaling(RopeScaling):
    """LongRoPE (Phi-3/Phi-4): per-frequency factors, `short_factor` up to the pretraining length,
    `long_factor` once any position passes it; cos/sin scaled by `attention_factor` (default
    sqrt(1 + ln(factor) / ln(original)), factor = max_position_embeddings / original)."""
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    factor: float = 1.0
    given_attention_factor: float | None = None
    rope_type = "longrope"
    length_dependent = True

    @property
    def attention_factor(self) -> float:  # type: ignore[override]
        if self.given_attention_factor is not None:
            return self.given_attention_factor
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))

    def _with(self, factors: tuple[float, ...], base: float, dim: int, device=None) -> torch.Tensor:
        ext = torch.tensor(factors, dtype=torch.float32, device=device)
        shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (ext * base ** shape)

    def inv_freq(self, base: float, dim: int, device=None) -> torch.Tensor:
        return self._with(self.short_factor, base, dim, device)

    def at_length(self, inv_freq: torch.Tensor, base: float, dim: int, seq_len: torch.Tensor) -> torch.Tensor:
        long = self._with(self.long_factor, base, dim, inv_freq.device)
        return torch.where(seq_len > self.original_max_position_embeddings, long, inv_freq)


def scaling_from_dict(d: dict | None) -> RopeScaling:
    """A scaling object from a mapping with `type` (or `rope_type`) and that type's fields."""
    if not d:
        return RopeScaling()
    d = dict(d)
    kind = d.pop("type", None) or d.pop("rope_type", None) or "default"
    kinds = {"default": RopeScaling, "linear": LinearScaling, "dynamic": DynamicNTKScaling,
             "llama3": Llama3Scaling, "yarn": YarnScaling, "longrope": LongRopeScaling}
    if kind not in kinds:
        raise ValueError(f"unknown RoPE scaling {kind!r}; supported: {', '.join(kinds)}")
    return kinds[kind](**d)
