"""vexpert_kernels: fused kernels for the visual-expert (CogVLM-style) transformer block."""
from .config import VisualExpertConfig
from .routing import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, RoutingPlan, build_position_ids, expert_vision_mask
from ._triton_compat import HAS_TRITON, interpret_mode

__version__ = "0.1.0"

__all__ = ["VisualExpertConfig", "RoutingPlan", "build_position_ids", "expert_vision_mask",
           "LANGUAGE_TOKEN_TYPE", "VISION_TOKEN_TYPE", "HAS_TRITON", "interpret_mode", "__version__"]
