"""The fused visual-expert layer: a drop-in for HF ``CogVLMDecoderLayer``, plus a stack that stays in routed order.

Data flow of one layer (hidden states in routed order ``[T, D]``, see RoutingPlan)::

    h = rmsnorm(x)                                     ops.rmsnorm (Triton/CUDA/torch)
    q, k, v = routed_qkv_rope(h)                       grouped GEMM; epilogue: bias, RoPE, store in [B, heads, L, hd]
    o = mixed_attention(q, k, v)                       sequence order; causal or bidirectional images; padding
    x = x + routed_linear(permute(o))                  grouped GEMM; epilogue: residual
    x = routed_swiglu_mlp(rmsnorm(x), residual=x)      grouped GEMMs; epilogues: silu(g)*u, residual; backward:
                                                       SwiGLU bwd in the down dX epilogue

Parameters live in the same submodules as HF (``self_attn.vision_expert_query_key_value`` ...), so state dicts are
HF-compatible both ways and ``patch_cogvlm`` can share an HF layer's modules without copying. Projections that are not
plain ``nn.Linear`` (e.g. PEFT/LoRA wrappers) are called as modules on the two contiguous expert slices instead.

RoPE: the cos/sin table comes from the layer's rotary module's own ``inv_freq`` (``RoutingPlan.rope_table``), built
once per model forward for all layers that share a ``RopeCache``. Layers called one by one by an HF decoder share one
plan per model forward through a ``PlanCache`` (see ``layer_context.py`` and ``integrations.hf``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisualExpertConfig
from .reference import RMSNorm, VisionExpertAttention, VisionExpertMLP, apply_rotary
from .layer_context import PlanCache, RopeCache, keep_mask_from_additive, rope_inputs  # noqa: F401  (re-exported)
from .routing import RoutingPlan
from .validation import (check_block_forward, check_block_init, check_layers_call, check_packed_plan,
                         check_stack_init, default_position_ids, env_attention_backend, resolve_gemm_path)


def _plain_linear(module) -> bool:
    return type(module) is nn.Linear


def _get(modules: dict, name: str, make):
    return modules[name] if modules.get(name) is not None else make()


def _routed_modules(x, mod_vision, mod_language, plan, residual=None):
    """Generic path for wrapped projections: call each expert's module on its contiguous row range."""
    nv = plan.num_vision
    y = torch.cat([mod_vision(x[:nv]), mod_language(x[nv:])], 0)
    return y if residual is None else residual + y


_check_packed = check_packed_plan


def _attention_choice(requested, gemm_path, q, k, v, key_padding_mask, attn_bias):
    """The attention backend a block asks for. Explicit names and ``VEXPERT_ATTENTION_BACKEND`` reach the op as
    given. Only for ``"auto"`` on CPU tensors under the Triton interpreter, with the block on the Triton path, the
    block runs OUR kernel (the op's auto would pick sdpa there) — when that kernel can serve the request."""
    if requested != "auto" or gemm_path != "triton" or q.is_cuda or env_attention_backend() is not None:
        return requested
    from .ops.attention import attention_backend_reason

    why = attention_backend_reason("triton", q, k, v, key_padding_mask=key_padding_mask, attn_bias=attn_bias)
    return "triton" if why is None else "auto"


class VisualExpertBlock(nn.Module):
    """Fused CogVLM decoder layer. Same parameter names, state-dict keys and forward signature as HF (and as
    :class:`vexpert_kernels.reference.VisualExpertBlock`), plus ``plan=`` to share one RoutingPlan across layers.

    backend: ``"auto"`` (passed to the routed GEMM ops as ``"auto"``: ``VEXPERT_GEMM_BACKEND``, then the ops'
    dispatch decide — Triton kernels on CUDA tensors and on CPU tensors when ``TRITON_INTERPRET=1``, plain PyTorch
    otherwise), ``"triton"`` or ``"torch"``. ``attention_backend`` (``"auto"`` or a name of
    ``ops.attention.BACKENDS``) is passed to ``ops.mixed_attention``, where ``"auto"`` honours
    ``VEXPERT_ATTENTION_BACKEND``; under the CPU interpreter, auto runs our Triton attention when it can serve the
    request. Unknown names raise ValueError here, at construction. The GEMM path of the last forward is in
    ``block.backend`` (``"triton"``, ``"torch"``, ``"grouped_mm"``, or ``"dense-language"`` for decode steps).
    Every forward input is validated first (``validation.check_block_forward``).
    """

    def __init__(self, config: VisualExpertConfig, *, backend: str = "auto", attention_backend: str = "auto",
                 _modules: Optional[dict] = None):
        super().__init__()
        check_block_init(config, backend, attention_backend)
        self.config = config
        self.hidden_size = config.hidden_size
        self.requested_backend = backend
        self.attention_backend = attention_backend
        m = _modules or {}
        self.self_attn = _get(m, "self_attn", lambda: VisionExpertAttention(config))
        self.mlp = _get(m, "mlp", lambda: VisionExpertMLP(config))
        self.input_layernorm = _get(m, "input_layernorm", lambda: RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.post_attention_layernorm = _get(m, "post_attention_layernorm",
                                             lambda: RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self._last_backend = None
        # set by patch_cogvlm on layers of an HF model (see integrations.hf):
        self.plan_cache: Optional[PlanCache] = None   # shared by the model's layers: one plan per model forward
        self.hf_decoder_mask = False    # a 4-D attention_mask is the HF decoder's causal + key-padding mask
        self.rope_positions = "module"  # "fp32": exact positions even if the rotary module would round them
        self.rope_cache = RopeCache()   # shared by a model's layers (patch_cogvlm, stack, LM): one table per forward
        object.__setattr__(self, "_rope_module", None)  # see share_rope_with (plain attribute, not a submodule)

    def share_rope_with(self, rotary_emb: Optional[nn.Module]) -> None:
        """Read RoPE from ``rotary_emb`` instead of this layer's own ``self_attn.rotary_emb``, unchecked. Layers
        sharing one ``rope_cache`` (``patch_cogvlm``, stacks, ``VisualExpertLM``) already share one table per forward
        when their rotary modules' states are equal (checked once, see ``layer_context.RopeCache``). Not registered
        as a submodule (state dict unchanged)."""
        object.__setattr__(self, "_rope_module", rotary_emb)

    def _rotary(self):
        if self._rope_module is not None:
            return self._rope_module
        return getattr(self.self_attn, "rotary_emb", None)

    @classmethod
    def from_hf_layer(cls, layer: nn.Module, config: VisualExpertConfig, **kwargs) -> "VisualExpertBlock":
        """Wrap an HF ``CogVLMDecoderLayer``'s submodules (shared, not copied)."""
        return cls(config, _modules=dict(self_attn=layer.self_attn, mlp=layer.mlp,
                                         input_layernorm=layer.input_layernorm,
                                         post_attention_layernorm=layer.post_attention_layernorm), **kwargs)

    # ------------------------------------------------------------------ which path
    @property
    def backend(self) -> str:
        """Kernel path of the last forward (before any forward: the path the parameters' device would take)."""
        if self._last_backend is not None:
            return self._last_backend
        return self._resolve_backend(self.input_layernorm.weight)

    def _resolve_backend(self, x: torch.Tensor) -> str:
        return resolve_gemm_path(self.requested_backend, x)

    # ------------------------------------------------------------------ HF-signature forward
    def forward(self, hidden_states, token_type_ids=None, position_ids=None, attention_mask=None,
                past_key_value=None, output_attentions=False, use_cache=False, plan: Optional[RoutingPlan] = None,
                routed: bool = False):
        """hidden_states [B, L, D]; token_type_ids [B, L]; position_ids [B, L] (HF rule when None); attention_mask
        None | 2-D keep [B, past+L] | 4-D additive [B, 1, L, past+L]; past_key_value (k, v) [B, KV, past, hd].
        Returns ``(hidden_states,)`` (+ ``(None,)`` if output_attentions) (+ ``(present,)`` if use_cache).

        ``routed=True``: hidden_states is [T, D] in ``plan``'s routed order (token_type_ids unused) and so is the
        output — what a stack uses between layers. Going through ``__call__`` keeps FSDP/DDP/forward hooks working.
        A packed plan (``RoutingPlan.build(tt, cu_seqlens=...)``, hidden_states [1, total, D]) keeps its sequences
        apart: varlen attention, position ids restarting per sequence; no attention_mask / past_key_value then.

        Validated before any kernel (``validation.check_block_forward``; TypeError/ValueError naming the argument):
        position_ids [B, L] or [1, L] (broadcast, as HF), a 2-D mask of exactly [B, past+L] (batch 1 is not
        broadcast), past_key_value a (k, v) pair [B, KV, past, hd], hidden_states in the parameters' dtype/device.
        A ``plan`` must match ``token_type_ids``: shapes always; values when on the CPU or under ``VEXPERT_DEBUG=1``
        (on CUDA otherwise no host sync is spent on it)."""
        token_type_ids, position_ids = check_block_forward(self, hidden_states, token_type_ids, position_ids,
                                                           attention_mask, past_key_value, plan, routed)
        if routed:
            out, present = self.forward_routed(hidden_states, plan, position_ids=position_ids,
                                               attention_mask=attention_mask, past_key_value=past_key_value,
                                               use_cache=use_cache)
            return (out, present) if use_cache else (out,)
        B, L, _ = hidden_states.shape
        if plan is not None and plan.packed_cu_seqlens is not None:
            _check_packed(plan, attention_mask, past_key_value)
        elif position_ids is None:
            # (a packed plan keeps position_ids None: its routed_position_ids restart at every sequence)
            position_ids = self._default_position_ids(token_type_ids, attention_mask, past_key_value)
        own_plan = plan is None
        if own_plan:
            plan, attention_mask = self._plan_for(token_type_ids, attention_mask)
        if L == 1 and own_plan:
            # decode: the last token of a row always uses the language expert -> dense path, no routing work
            out, present = self._forward_language_only(hidden_states, position_ids, attention_mask, past_key_value,
                                                       use_cache, plan)
        else:
            if tuple(plan.token_type_ids.shape) != (B, L):
                raise ValueError(f"plan was built for [B, L] = {tuple(plan.token_type_ids.shape)}, "
                                 f"hidden_states has {(B, L)}")
            x = plan.permute(hidden_states)
            x, present = self.forward_routed(x, plan, position_ids=position_ids, attention_mask=attention_mask,
                                             past_key_value=past_key_value, use_cache=use_cache)
            out = plan.unpermute(x)
        outputs = (out,)
        if output_attentions:
            outputs += (None,)  # like HF's VisionExpertAttention, which never returns weights
        if use_cache:
            outputs += (present,)
        return outputs

    # ------------------------------------------------------------------ one plan per model forward, RoPE source
    def _plan_for(self, token_type_ids, attention_mask):
        """(plan, attention_mask) for a call without ``plan=``. With a ``plan_cache`` (patched HF models) the plan
        is built once per model forward and shared by all layers. On such layers (``hf_decoder_mask``) the decoder's
        4-D additive mask is read as causal + key padding and handed on as a 2-D keep mask, so attention gets a
        key-padding mask (fast backends) instead of a dense float bias."""
        L = token_type_ids.shape[1]

        def build():
            mask = attention_mask
            if mask is not None and mask.dim() == 4 and self.hf_decoder_mask:
                mask = keep_mask_from_additive(mask, token_type_ids.shape[0])
            keep = mask[:, -L:] if mask is not None and mask.dim() == 2 else None
            return RoutingPlan.build(token_type_ids, keep), mask

        if self.plan_cache is None:
            return build()
        return self.plan_cache.get(token_type_ids, attention_mask, build)

    def _default_position_ids(self, token_type_ids, attention_mask, past_key_value):
        """HF position ids when none are given: once per model forward for layers sharing a ``plan_cache``."""
        if self.plan_cache is None or past_key_value is not None:  # (raises with a KV cache: positions required)
            return default_position_ids(token_type_ids, attention_mask, past_key_value)
        return self.plan_cache.positions(token_type_ids, attention_mask,
                                         lambda: default_position_ids(token_type_ids, attention_mask, None))

    def _rope_cos_sin(self, plan: RoutingPlan, position_ids=None):
        """fp32 (cos, sin) [T, hd/2] in routed order from the rotary module's own state; position_ids None (the
        plan's) or integer [B, L] / [1, L]. One table per model forward for all layers sharing ``rope_cache``."""
        rot = self._rotary()
        src = self.rope_cache.inputs(rot, self.rope_positions) if rot is not None else None
        if src is None:  # no inv_freq to read: the config's theta
            cfg = self.config
            inv = self.rope_cache.theta_inv_freq(cfg.rope_theta, cfg.head_dim, plan.device)
            pdt = cfg.rope_position_dtype
        else:
            inv, pdt, _ = src
        return self.rope_cache.table(plan, inv, pdt, position_ids)

    @property
    def rope_source(self) -> str:
        """Where this layer's RoPE comes from (for reports)."""
        rot = self._rotary()
        src = rope_inputs(rot, self.rope_positions) if rot is not None else None
        return src[2] if src is not None else f"config.rope_theta={self.config.rope_theta} (no inv_freq buffer)"

    # ------------------------------------------------------------------ routed-order forward (used by the stack)
    def forward_routed(self, x: torch.Tensor, plan: RoutingPlan, *, position_ids=None, attention_mask=None,
                       past_key_value=None, use_cache=False):
        """x [T, D] in the plan's routed order -> (x' [T, D] routed, present_key_value or None)."""
        x, present = self._attention_routed(x, plan, position_ids=position_ids, attention_mask=attention_mask,
                                            past_key_value=past_key_value, use_cache=use_cache)
        return self._mlp_routed(x, plan), present

    def _backends(self, x):
        backend = self._resolve_backend(x)
        self._last_backend = backend
        gemm_backend = self.requested_backend  # "auto" reaches the ops: VEXPERT_GEMM_BACKEND / their dispatch decide
        # on CUDA let rmsnorm pick (csrc kernel > Triton > torch); on CPU run the Triton kernel through the interpreter
        norm_backend = "auto" if x.is_cuda else ("triton" if backend == "triton" else "torch")
        return backend, gemm_backend, norm_backend

    def _attention_routed(self, x, plan, *, position_ids=None, attention_mask=None, past_key_value=None,
                          use_cache=False):
        """x + attention(input_layernorm(x)), routed order in and out."""
        from .ops import mixed_attention, mixed_attention_varlen, rmsnorm, routed_linear

        cfg, attn = self.config, self.self_attn
        backend, gemm_backend, norm_backend = self._backends(x)
        B, L = plan.batch_size, plan.seq_len
        H, hd = cfg.num_attention_heads, cfg.head_dim

        h = rmsnorm(x, self.input_layernorm.weight, cfg.rms_norm_eps, backend=norm_backend)
        q, k, v = self._qkv(h, plan, position_ids, gemm_backend)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        present = (k, v) if use_cache else None
        key_padding_mask, attn_bias = self._masks(attention_mask, plan, k.shape[2])
        spans = plan.image_span_ids if cfg.image_attention == "bidirectional" else None
        attention_backend = _attention_choice(self.attention_backend, backend, q, k, v, key_padding_mask, attn_bias)
        if plan.packed_cu_seqlens is not None:
            # packed input [1, total]: attention must not cross sequences -> varlen over the plan's cu_seqlens
            _check_packed(plan, attention_mask, past_key_value)
            cu, n = plan.packed_cu_seqlens, plan.max_seqlen
            o = mixed_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, n, n,
                                       image_span_ids=None if spans is None else spans[0],
                                       image_attention=cfg.image_attention, backend=attention_backend,
                                       out_index=plan.inv_perm)  # [T, H*hd] straight in routed order
        else:
            o = mixed_attention(q, k, v, key_padding_mask=key_padding_mask, image_span_ids=spans,
                                image_attention=cfg.image_attention, attn_bias=attn_bias, backend=attention_backend,
                                out_index=plan.inv_perm.view(B, L))  # [T, H*hd] straight in routed order

        dv, dl = attn.vision_expert_dense, attn.language_expert_dense
        if _plain_linear(dv) and _plain_linear(dl):
            x = routed_linear(o, dv.weight, dl.weight, plan, residual=x, backend=gemm_backend)
        else:
            x = _routed_modules(o, dv, dl, plan, residual=x)
        return x, present

    def _mlp_routed(self, x, plan):
        """x + mlp(post_attention_layernorm(x)), routed order in and out."""
        from .ops import rmsnorm, routed_swiglu_mlp

        cfg, mlp = self.config, self.mlp
        _, gemm_backend, norm_backend = self._backends(x)
        h = rmsnorm(x, self.post_attention_layernorm.weight, cfg.rms_norm_eps, backend=norm_backend)
        mv, ml = mlp.vision_mlp, mlp.language_mlp
        projs = [mv.gate_proj, mv.up_proj, mv.down_proj, ml.gate_proj, ml.up_proj, ml.down_proj]
        if all(_plain_linear(p) for p in projs):
            # one op: its backward runs the SwiGLU backward in the down projection's dX epilogue
            x = routed_swiglu_mlp(h, mv.gate_proj.weight, mv.up_proj.weight, mv.down_proj.weight, ml.gate_proj.weight,
                                  ml.up_proj.weight, ml.down_proj.weight, plan, residual=x, backend=gemm_backend)
        else:
            x = _routed_modules(h, mv, ml, plan, residual=x)
        return x

    def _qkv(self, h, plan, position_ids, gemm_backend):
        """Routed QKV + RoPE -> q [B, H, L, hd], k, v [B, KV, L, hd] (sequence order); position_ids [B|1, L] / None."""
        from .ops import routed_qkv_rope

        cfg, attn = self.config, self.self_attn
        qv, ql = attn.vision_expert_query_key_value, attn.language_expert_query_key_value
        cos_sin = self._rope_cos_sin(plan, position_ids)
        if _plain_linear(qv) and _plain_linear(ql):
            return routed_qkv_rope(h, qv.weight, ql.weight, plan, num_heads=cfg.num_attention_heads,
                                   num_kv_heads=cfg.num_key_value_heads, rope_cos_sin=cos_sin,
                                   bias_vision=qv.bias, bias_language=ql.bias, backend=gemm_backend)
        # wrapped projections (PEFT/LoRA ...): call the modules, then the same RoPE table in sequence order
        return self._split_rope(plan.unpermute(_routed_modules(h, qv, ql, plan)), plan, cos_sin)

    def _split_rope(self, qkv, plan, cos_sin):
        """qkv [B, L, N] sequence order -> q, k (RoPE'd with the plan's routed-order table), v."""
        cfg = self.config
        B, L, _ = qkv.shape
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = torch.split(qkv, [H * hd, KV * hd, KV * hd], dim=-1)
        q = q.view(B, L, H, hd).transpose(1, 2)
        k = k.view(B, L, KV, hd).transpose(1, 2)
        v = v.view(B, L, KV, hd).transpose(1, 2).contiguous()
        cos, sin = (t.index_select(0, plan.inv_perm).view(B, L, hd // 2).repeat(1, 1, 2) for t in cos_sin)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    @staticmethod
    def _masks(attention_mask, plan, kv_len):
        """(key_padding_mask [B, kv_len] bool or None, additive 4-D bias or None)."""
        if attention_mask is None:
            if plan is not None and plan.attention_mask is not None and kv_len == plan.seq_len:
                return plan.attention_mask, None
            return None, None
        if attention_mask.dim() == 4:
            return None, attention_mask
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask must be a 2-D keep mask [B, past+L={kv_len}] or a 4-D additive mask, "
                             f"got {tuple(attention_mask.shape)}")
        return attention_mask != 0, None

    # ------------------------------------------------------------------ decode
    def _forward_language_only(self, hidden_states, position_ids, attention_mask, past_key_value, use_cache, plan):
        x, present = self._attention_language_only(hidden_states, position_ids, attention_mask, past_key_value,
                                                   use_cache, plan)
        return self._mlp_language_only(x), present

    def _attention_language_only(self, hidden_states, position_ids, attention_mask, past_key_value, use_cache, plan):
        """Decode step (every token language): dense language-expert attention; RoPE from the plan's table."""
        from .ops import mixed_attention

        attn = self.self_attn
        B, L, _ = hidden_states.shape
        self._last_backend = "dense-language"
        h = self.input_layernorm(hidden_states)
        q, k, v = self._split_rope(attn.language_expert_query_key_value(h), plan,
                                   self._rope_cos_sin(plan, position_ids))
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        present = (k, v) if use_cache else None
        key_padding_mask, attn_bias = self._masks(attention_mask, None, k.shape[2])
        o = mixed_attention(q, k, v, key_padding_mask=key_padding_mask, attn_bias=attn_bias,
                            backend=self.attention_backend)
        return hidden_states + attn.language_expert_dense(o.transpose(1, 2).reshape(B, L, -1)), present

    def _mlp_language_only(self, x):
        mlp = self.mlp.language_mlp
        h = self.post_attention_layernorm(x)
        return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))


class VisualExpertStack(nn.Module):
    """N fused layers that permute once at the start, stay in routed order, and un-permute once at the end."""

    def __init__(self, config: VisualExpertConfig, num_layers: int, **block_kwargs):
        super().__init__()
        check_stack_init(config, num_layers, block_kwargs)
        self.config = config
        self.layers = nn.ModuleList(VisualExpertBlock(config, **block_kwargs) for _ in range(num_layers))
        RopeCache.shared_by(self.layers)  # one RoPE table per forward for all layers

    def forward(self, hidden_states, token_type_ids, position_ids=None, attention_mask=None, plan=None):
        return visual_expert_layers(self.layers, hidden_states, token_type_ids, position_ids=position_ids,
                                    attention_mask=attention_mask, plan=plan)


def visual_expert_layers(layers, hidden_states, token_type_ids, *, position_ids=None, attention_mask=None,
                         plan: Optional[RoutingPlan] = None, checkpoint: bool = False):
    """Run fused layers over [B, L, D] with ONE RoutingPlan and one permute/unpermute pair (no KV cache).

    ``checkpoint=True`` recomputes each layer in backward (torch.utils.checkpoint)."""
    token_type_ids, position_ids = check_layers_call(layers, hidden_states, token_type_ids, position_ids,
                                                     attention_mask, plan, checkpoint)
    if plan is None:
        keep = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        plan = RoutingPlan.build(token_type_ids, keep)
    x = plan.permute(hidden_states)
    for layer in layers:
        # through __call__ so FSDP2/DDP/forward hooks see every layer
        if checkpoint:
            (x,) = torch.utils.checkpoint.checkpoint(layer, x, plan=plan, position_ids=position_ids,
                                                     attention_mask=attention_mask, routed=True, use_reentrant=False)
        else:
            (x,) = layer(x, plan=plan, position_ids=position_ids, attention_mask=attention_mask, routed=True)
    return plan.unpermute(x)
