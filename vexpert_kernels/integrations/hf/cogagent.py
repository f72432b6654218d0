"""CogAgent's decoder layer, fused: visual-expert self-attention and MLP in routed order (one RoutingPlan per model
forward, as for CogVLM), with the layer's own cross-attention module (to the high-resolution image features) called,
unchanged, in sequence order between them.

HF layer (``CogAgentDecoderLayer``)::

    x = x + self_attn(input_layernorm(x))                          -> fused (routed order)
    x = x + cross_attn(post_cross_attention_layernorm(x), encoder_outputs)   -> the HF module, called as is
    x = x + mlp(post_attention_layernorm(x))                       -> fused (routed order)

Cache: ``(k, v, cross_cache)`` — the self-attention pair (KV heads, not expanded) plus whatever the cross-attention
module returns as its cache (its keys/values of the image features), handed back to it on the next step.
"""
from __future__ import annotations

from ...block import VisualExpertBlock
from ...validation import check_forward_args as _check_forward_args, check_position_ids


class CogAgentExpertBlock(VisualExpertBlock):
    """Fused ``CogAgentDecoderLayer`` with the same submodules (shared, not copied) and forward signature."""

    def __init__(self, config, *, cross_attn, post_cross_attention_layernorm, **kwargs):
        super().__init__(config, **kwargs)
        self.cross_attn = cross_attn
        self.post_cross_attention_layernorm = post_cross_attention_layernorm

    @classmethod
    def from_hf_layer(cls, layer, config, **kwargs) -> "CogAgentExpertBlock":
        return cls(config, _modules=dict(self_attn=layer.self_attn, mlp=layer.mlp,
                                         input_layernorm=layer.input_layernorm,
                                         post_attention_layernorm=layer.post_attention_layernorm),
                   cross_attn=layer.cross_attn, post_cross_attention_layernorm=layer.post_cross_attention_layernorm,
                   **kwargs)

    def _cross(self, x, encoder_outputs, cross_attention_mask, past, output_attentions, use_cache):
        out = self.cross_attn(self.post_cross_attention_layernorm(x), encoder_outputs=encoder_outputs,
                              attention_mask=cross_attention_mask, past_key_value=past,
                              output_attentions=output_attentions, use_cache=use_cache)
        return x + out[0], (out[-1] if use_cache else None)

    def forward(self, hidden_states, encoder_outputs=None, token_type_ids=None, position_ids=None,
                attention_mask=None, cross_attention_mask=None, past_key_value=None, output_attentions=False,
                use_cache=False):
        """As HF: hidden_states [B, L, D]; encoder_outputs [B, N, cross_hidden] (may be None once the cross cache
        exists); past_key_value ``(k, v, cross_cache)``. Returns ``(hidden,)`` (+ ``(None,)``) (+ ``(present,)``)."""
        token_type_ids = _check_forward_args(hidden_states, token_type_ids, self.hidden_size)
        B, L, _ = hidden_states.shape
        position_ids = check_position_ids(position_ids, B, L, hidden_states.device, broadcast=False)
        self_past = tuple(past_key_value[:2]) if past_key_value is not None else None
        cross_past = past_key_value[-1] if past_key_value is not None and len(past_key_value) > 2 else None
        if position_ids is None:
            position_ids = self._default_position_ids(token_type_ids, attention_mask, self_past)
        plan, attention_mask = self._plan_for(token_type_ids, attention_mask)
        if L == 1:  # decode: language expert only, dense
            x, present = self._attention_language_only(hidden_states, position_ids, attention_mask, self_past,
                                                       use_cache, plan)
            x, present_cross = self._cross(x, encoder_outputs, cross_attention_mask, cross_past, output_attentions,
                                           use_cache)
            out = self._mlp_language_only(x)
        else:
            x, present = self._attention_routed(plan.permute(hidden_states), plan, position_ids=position_ids,
                                                attention_mask=attention_mask, past_key_value=self_past,
                                                use_cache=use_cache)
            x, present_cross = self._cross(plan.unpermute(x), encoder_outputs, cross_attention_mask, cross_past,
                                           output_attentions, use_cache)
            out = plan.unpermute(self._mlp_routed(plan.permute(x), plan))
        outputs = (out,)
        if output_attentions:
            outputs += (None,)
        if use_cache:
            outputs += (tuple(present) + (present_cross,),)
        return outputs
