"""vexpert_kernels: fused kernels for the visual-expert (CogVLM-style) transformer block."""
from ._triton_compat import HAS_TRITON, interpret_mode
from .block import VisualExpertBlock, VisualExpertStack, visual_expert_layers
from .config import VisualExpertConfig
from .integrations import patch_cogvlm
from .model import VisualExpertLM
from .routing import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, RoutingPlan, build_position_ids, expert_vision_mask

__version__ = "0.1.0"

__all__ = ["VisualExpertConfig", "RoutingPlan", "VisualExpertBlock", "VisualExpertStack", "visual_expert_layers",
           "VisualExpertLM", "patch_cogvlm", "build_position_ids", "expert_vision_mask", "LANGUAGE_TOKEN_TYPE",
           "VISION_TOKEN_TYPE", "HAS_TRITON", "interpret_mode", "__version__"]
