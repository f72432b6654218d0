"""Hugging Face CogVLM / CogVLM2 / CogAgent integration.

  patch.py     patch_cogvlm (in place, parameters shared), PatchReport, config_from_hf_layer
  cogagent.py  CogAgentExpertBlock: fused self-attention + MLP around the layer's own cross-attention module

Patched layers take RoPE from the model's own rotary module (``inv_freq`` buffer, its position dtype), share one
RoutingPlan per model forward, read the decoder's 4-D mask as key padding, and are DeepSpeed ZeRO-3 leaf modules.
"""
from .cogagent import CogAgentExpertBlock
from .patch import PatchReport, config_from_hf_layer, patch_cogvlm

__all__ = ["patch_cogvlm", "config_from_hf_layer", "PatchReport", "CogAgentExpertBlock"]
