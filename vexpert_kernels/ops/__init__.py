"""Functional ops (kernels -> launcher -> autograd -> torch.library registration), one file per op."""
from vexpert_kernels.ops.attention import (  # noqa: E402,F401
    attention_backend_reason,
    available_attention_backends,
    mixed_attention,
    mixed_attention_varlen,
)
from vexpert_kernels.ops.routed_linear import (  # noqa: E402,F401
    routed_linear,
    routed_qkv_rope,
    routed_swiglu,
    routed_swiglu_mlp,
)
from vexpert_kernels.ops.rmsnorm import (  # noqa: E402,F401
    rmsnorm,
    rmsnorm_permute,
    rmsnorm_routed,
)
