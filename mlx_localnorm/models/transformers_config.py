"""transformers' view of a LocalNorm config.json, so its AutoTokenizer can read our directories.

``mlx_lm.load`` loads the tokenizer with ``AutoTokenizer``, which builds the model's config
first. For an unknown ``model_type`` its fallback config standardizes ``rope_scaling`` and reads
``max_position_embeddings`` before setting it (llama3, yarn and longrope fail). The saved model
file registers this class before mlx-lm gets there.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig


class LocalNormConfig(PreTrainedConfig):
    """Every config.json key as an attribute; the model itself is built by mlx-lm."""

    model_type = "localnorm"

    def __post_init__(self, **kwargs):
        # RoPE is built by mlx-lm; transformers' RoPE checks would reject types mlx-lm supports.
        kwargs.pop("rope_scaling", None)
        super().__post_init__(**kwargs)


def register() -> None:
    """Make ``AutoConfig`` (and so ``AutoTokenizer``) know ``model_type: "localnorm"``."""
    AutoConfig.register(LocalNormConfig.model_type, LocalNormConfig, exist_ok=True)
