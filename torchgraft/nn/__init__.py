"""torchgraft.nn: building blocks that take plain dimensions or submodules (never a global config)."""
from torchgraft.nn.attention import Attention, make_attention_mask, repeat_kv
from torchgraft.nn.conv import BasicBlock, Bottleneck
from torchgraft.nn.embedding import PatchEmbed, TokenPositionEmbedding
from torchgraft.nn.kv_cache import KVCache, LayerKVCache
from torchgraft.nn.mlp import MLP, GatedMLP, activation_fn
from torchgraft.nn.norm import LayerNorm, RMSNorm, make_norm
from torchgraft.nn.rope import RotaryEmbedding, apply_rope, rotate_half
from torchgraft.nn.transformer import PostNormBlock, PreNormBlock
from torchgraft.nn.attention import FusedQKVAttention  # noqa: E402
from torchgraft.nn.mlp import FusedGatedMLP  # noqa: E402
from torchgraft.nn.norm import HeadNorm, OffsetRMSNorm  # noqa: E402
from torchgraft.nn.transformer import SandwichBlock  # noqa: E402

__all__ = [
    "MLP", "Attention", "BasicBlock", "Bottleneck", "GatedMLP", "KVCache", "LayerKVCache", "LayerNorm",
    "PatchEmbed", "PostNormBlock", "PreNormBlock", "RMSNorm", "RotaryEmbedding", "TokenPositionEmbedding",
    "activation_fn", "apply_rope", "make_attention_mask", "make_norm", "repeat_kv", "rotate_half",
]
__all__ += ["FusedGatedMLP", "FusedQKVAttention", "HeadNorm", "OffsetRMSNorm", "SandwichBlock"]
from torchgraft.nn.moe import MoE, ExpertLinear, GroupedExperts, SoftmaxTopK, load_balancing_loss  # noqa: E402

__all__ += ["ExpertLinear", "GroupedExperts", "MoE", "SoftmaxTopK", "load_balancing_loss"]
