from .hf import CogAgentExpertBlock, PatchReport, config_from_hf_layer, patch_cogvlm

__all__ = ["patch_cogvlm", "config_from_hf_layer", "PatchReport", "CogAgentExpertBlock"]
