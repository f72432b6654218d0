"""One RoPE cos/sin table per model forward, not one per layer: patched HF models (any position ids the decoder hands
its layers: none, [B, L], [1, L], int32; prefill and KV-cache decode), VisualExpertLM and VisualExpertStack; a layer
whose rotary buffer differs still gets its own (right) table. Counts the tables RoutingPlan.rope_table builds."""
import copy

import pytest
import torch

from upstream.common import decoder_attention_mask
from upstream.models import KINDS, make_batch, make_model
from vexpert_kernels import VisualExpertConfig
from vexpert_kernels.block import VisualExpertStack
from vexpert_kernels.integrations import patch_cogvlm
from vexpert_kernels.layer_context import RopeCache, rope_position_ids, same_rope_state
from vexpert_kernels.model import VisualExpertLM
from vexpert_kernels.routing import RoutingPlan
from vexpert_kernels.testing import rel_err, synthetic_batch

LAYERS = 3


@pytest.fixture
def tables(monkeypatch):
    """Every distinct (cos, sin) table RoutingPlan.rope_table hands out (a cached one is not counted twice)."""
    built = []
    real = RoutingPlan.rope_table

    def spy(self, *args, **kwargs):
        table = real(self, *args, **kwargs)
        if all(table[0] is not t for t in built):
            built.append(table[0])
        return table

    monkeypatch.setattr(RoutingPlan, "rope_table", spy)
    return built


def _position_ids(kind, B, L):
    if kind == "none":
        return None
    if kind == "1L":
        return torch.arange(L)[None]  # [1, L]: broadcast over the batch, as HF does
    return torch.arange(L, dtype=torch.int32)[None].expand(B, L).contiguous()  # [B, L] int32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pos", ["none", "1L", "int32"])
def test_patched_model_one_table_per_forward(kind, pos, tables):
    model = make_model(kind, num_hidden_layers=LAYERS)
    kw, keep = make_batch(model, "right")
    kw["position_ids"] = _position_ids(pos, *kw["input_ids"].shape)
    patched = copy.deepcopy(model)
    patch_cogvlm(patched, backend="torch")
    rope = patched.model.layers[0].rope_cache
    assert all(layer.rope_cache is rope for layer in patched.model.layers)
    with torch.no_grad():
        ref, _ = model(**kw)
        for forward in (1, 2):
            out, _ = patched(**kw)
            assert len(tables) == forward, f"{len(tables)} tables for {forward} forward(s) of {LAYERS} layers"
            assert rope.builds == forward
            assert rel_err(out[keep], ref[keep]) < 1e-5


@pytest.mark.parametrize("kind", ["cogvlm2", "cogagent"])
def test_patched_generate_one_table_per_step(kind, tables):
    """Prefill + decode steps through the tuple KV cache: one table per model forward."""
    model = make_model(kind, num_hidden_layers=LAYERS)
    kw, _ = make_batch(model, "left")
    patched = copy.deepcopy(model)
    patch_cogvlm(patched, backend="torch")
    n = 3
    tok_ref, _ = model.generate(**kw, max_new_tokens=n)
    tok, _ = patched.generate(**kw, max_new_tokens=n)
    assert torch.equal(tok, tok_ref)
    assert len(tables) == n  # prefill + n - 1 decode steps


def test_patched_layers_default_positions_once(tables):
    """A decoder that hands its layers no position ids: the HF default is built once per forward, like the plan."""
    model = make_model("cogvlm", num_hidden_layers=LAYERS)
    kw, _ = make_batch(model, "left")
    patch_cogvlm(model, backend="torch")
    B, L = kw["input_ids"].shape
    h = torch.randn(B, L, model.config.hidden_size)
    mask = decoder_attention_mask(kw["attention_mask"], B, L, h.dtype, h.device, 0)
    tt = kw["token_type_ids"]
    with torch.no_grad():
        for layer in model.model.layers:
            (h,) = layer(h, token_type_ids=tt, attention_mask=mask)
    cache = model.model.layers[0].plan_cache
    assert cache.builds == 1 and len(tables) == 1
    assert cache._positions is not None


def test_lm_one_table_per_forward_and_a_changed_buffer_gets_its_own(tables):
    torch.manual_seed(0)
    cfg = VisualExpertConfig.tiny()
    ref = VisualExpertLM(cfg, LAYERS, 32, backend="reference")
    fused = VisualExpertLM(cfg, LAYERS, 32, backend="fused", kernel_backend="torch")
    fused.load_state_dict(ref.state_dict())
    ids, tt, feats, _ = synthetic_batch(2, 12, 32, cfg.hidden_size, 4, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        assert rel_err(fused(ids, tt, image_features=feats), ref(ids, tt, image_features=feats)) < 1e-5
        assert len(tables) == 1
        fused(ids, tt, image_features=feats)
        assert len(tables) == 2
        # one layer's rotary buffer changed in place (a load_state_dict of other values): checked again, own table
        ref.layers[1].self_attn.rotary_emb.inv_freq.mul_(0.5)
        fused.load_state_dict(ref.state_dict())
        del tables[:]
        assert rel_err(fused(ids, tt, image_features=feats), ref(ids, tt, image_features=feats)) < 1e-5
        assert len(tables) == 2


def test_stack_one_table_per_forward(tables):
    cfg = VisualExpertConfig.tiny()
    stack = VisualExpertStack(cfg, LAYERS, backend="torch")
    tt = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]])
    with torch.no_grad():
        stack(torch.randn(2, 5, cfg.hidden_size), tt)
        stack(torch.randn(2, 5, cfg.hidden_size), tt, position_ids=torch.arange(5)[None])
    assert len(tables) == 2


def test_rope_cache_keys_and_copies():
    cfg = VisualExpertConfig.tiny()
    stack = VisualExpertStack(cfg, 2, backend="torch")
    r0, r1 = (layer.self_attn.rotary_emb for layer in stack.layers)
    assert same_rope_state(r0, r1)
    r1.inv_freq[0] += 1
    assert not same_rope_state(r0, r1)
    plan = RoutingPlan.build(torch.tensor([[0, 1, 1, 0]]))
    cache, pos = RopeCache(), torch.arange(4)[None]
    a = cache.table(plan, r0.inv_freq, None, pos)
    assert cache.table(plan, r0.inv_freq, None, pos) is a and cache.builds == 1
    pos.add_(1)  # in place: new positions, new table
    assert cache.table(plan, r0.inv_freq, None, pos) is not a and cache.builds == 2
    assert rope_position_ids(pos.int(), 3, 4).dtype == torch.int64
    copied = copy.deepcopy(stack)
    assert copied.layers[0].rope_cache is copied.layers[1].rope_cache is not stack.layers[0].rope_cache


def test_rope_cache_frees_tables_with_their_plan():
    cache, inv = RopeCache(), torch.rand(8)
    plan = RoutingPlan.build(torch.tensor([[0, 1, 1, 0]]))
    cache.table(plan, inv, None)
    assert len(cache._tables) == 1
    del plan  # the forward is over
    assert cache._tables == [] and cache._plan is None
