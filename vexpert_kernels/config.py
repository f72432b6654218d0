"""Configuration of one CogVLM-style visual-expert decoder layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class VisualExpertConfig:
    """Sizes and options of a visual-expert layer (defaults: CogVLM-chat-17B).

    ``rope_position_dtype`` reproduces a quirk of the HF code: it builds the RoPE position table in the
    dtype of ``inv_freq``, so a model loaded in bf16 rounds positions to bf16 (exact only up to 256).
    ``None`` (default) computes positions in fp32; ``torch.bfloat16`` matches such a checkpoint's HF outputs.
    """

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vision_qkv_bias: bool = False
    language_qkv_bias: bool = False
    max_position_embeddings: int = 2048
    rope_position_dtype: object = None  # None (fp32) or torch.bfloat16 / torch.float16 for the HF quirk
    image_attention: str = "causal"     # "causal" (CogVLM) or "bidirectional" inside each contiguous image span

    def __post_init__(self):
        from .validation import check_config

        check_config(self)  # every field, at construction (ValueError/TypeError naming the field and its value)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        """Output width of the fused QKV projection: H*hd + 2*KV*hd."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def replace(self, **changes) -> "VisualExpertConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def cogvlm_chat_17b(cls) -> "VisualExpertConfig":
        """THUDM/cogvlm-chat-hf: MHA 32x128, intermediate 11008, theta 1e4, no QKV bias."""
        return cls()

    @classmethod
    def cogvlm2_19b(cls) -> "VisualExpertConfig":
        """THUDM/cogvlm2-llama3-chat-19B: GQA 32/8 heads, intermediate 14336, theta 5e5, vision QKV bias."""
        return cls(intermediate_size=14336, num_key_value_heads=8, rope_theta=500000.0, vision_qkv_bias=True,
                   max_position_embeddings=8192)

    @classmethod
    def tiny(cls, **overrides) -> "VisualExpertConfig":
        """A small GQA config with odd-ish sizes for tests (hidden 64, 4 heads x 16, 2 KV heads, intermediate 88)."""
        base = dict(hidden_size=64, intermediate_size=88, num_attention_heads=4, num_key_value_heads=2,
                    rope_theta=10000.0, vision_qkv_bias=True, max_position_embeddings=512)
        base.update(overrides)
        return cls(**base)
