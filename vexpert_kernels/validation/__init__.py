"""Input validation shared by every public entry point: one place, one message style.

Every check raises ``TypeError`` (wrong kind of object / dtype) or ``ValueError`` (wrong shape, device, range) with
a message naming the argument, what it got and what was expected — before any kernel runs. Checks that would need
device values (e.g. the contents of a CUDA ``cu_seqlens``) never add a host sync on the hot path: they run where
the values are already on the host (CPU tensors), or when ``VEXPERT_DEBUG=1`` (tests set it); kernels are written
bound-safe for every input that passes the host-side checks.

  tensors.py       check_tensor, check_same_dtype, check_cu_seqlens, FLOAT_DTYPES, debug_checks_enabled (the ops)
  scalars.py       check_choice, check_positive_finite, check_positive_int, check_bool
  plan.py          routing inputs (``RoutingPlan.build``): token types, keep masks, packed cu_seqlens; a plan
                   matching the call it is handed to; packed plans
  backends.py      block / model backend names; how ``backend="auto"`` and ``VEXPERT_GEMM_BACKEND`` /
                   ``VEXPERT_ATTENTION_BACKEND`` resolve
  layer_inputs.py  one forward argument each: hidden_states, position_ids, attention_mask, past_key_value; the HF
                   position ids when none are given
  layers.py        whole calls: ``VisualExpertBlock`` construction / forward, ``visual_expert_layers``,
                   ``VisualExpertStack``
  model.py         ``VisualExpertLM``, ``VisualExpertConfig``, ``patch_cogvlm``

Imports point down this list only; modules of the package proper (routing, config, block, ops) are imported lazily
inside the checks that need them (no import cycles). Import the names from ``vexpert_kernels.validation``.
"""
from .tensors import FLOAT_DTYPES, check_cu_seqlens, check_same_dtype, check_tensor, debug_checks_enabled
from .scalars import check_bool, check_choice, check_positive_finite, check_positive_int
from .plan import (check_keep_mask, check_packed_plan, check_plan, check_plan_cu_seqlens, check_plan_matches,
                   check_token_type_ids)
from .backends import (BLOCK_BACKENDS, MODEL_BACKENDS, attention_backend_choices, check_backend_names,
                       env_attention_backend, resolve_gemm_path)
from .layer_inputs import (check_attention_mask, check_forward_args, check_hidden_states, check_past_key_value,
                           check_position_ids, default_position_ids)
from .layers import check_block_forward, check_block_init, check_layers_call, check_stack_init
from .model import check_config, check_lm_forward, check_lm_init, check_patch_args

__all__ = [
    "FLOAT_DTYPES", "debug_checks_enabled", "check_tensor", "check_same_dtype", "check_cu_seqlens",
    "check_choice", "check_positive_finite", "check_positive_int", "check_bool",
    "check_token_type_ids", "check_keep_mask", "check_plan_cu_seqlens", "check_plan", "check_plan_matches",
    "check_packed_plan",
    "BLOCK_BACKENDS", "MODEL_BACKENDS", "attention_backend_choices", "check_backend_names", "resolve_gemm_path",
    "env_attention_backend",
    "check_hidden_states", "check_forward_args", "check_position_ids", "check_attention_mask",
    "check_past_key_value", "default_position_ids",
    "check_block_init", "check_block_forward", "check_layers_call", "check_stack_init",
    "check_lm_init", "check_lm_forward", "check_config", "check_patch_args",
]
