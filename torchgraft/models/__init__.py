"""The model zoo. Importing this package registers every family and preset."""
from torchgraft.models import bert, gpt, lenet, llama, policy, resnet, vit  # noqa: F401
from torchgraft.models import gemma, mistral, olmo2, phi3, qwen, smollm  # noqa: F401
from torchgraft.models import mixtral, qwen3_moe  # noqa: F401
from torchgraft.models import qwen2_moe  # noqa: F401,E402
from torchgraft.models import reward  # noqa: F401,E402  (registers the "reward" family)
from torchgraft.models.registry import (
    build,
    get_config,
    list_models,
    materialize,
    register_family,
    register_preset,
)

__all__ = ["build", "get_config", "list_models", "materialize", "register_family", "register_preset"]
