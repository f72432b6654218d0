"""RoutingPlan, expert rule and position ids: hand-written spec examples, fuzzed invariants, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vexpert_kernels import RoutingPlan, build_position_ids, expert_vision_mask

# bos, boi, 4 patches, eoi, text x3  (spec: bos 0, boi 1, all patches 2, eoi 3, text 4, 5, ...)
ONE_IMAGE = [0, 1, 1, 1, 1, 1, 1, 0, 0, 0]


def test_spec_example_one_image():
    tt = torch.tensor([ONE_IMAGE])
    assert expert_vision_mask(tt).int().tolist() == [[0, 1, 1, 1, 1, 1, 0, 0, 0, 0]]  # eoi -> language
    assert build_position_ids(tt).tolist() == [[0, 1, 2, 2, 2, 2, 3, 4, 5, 6]]


def test_image_at_row_end_and_two_images():
    tt = torch.tensor([[0, 0, 1, 1, 1],            # image runs to the row end: its last token is language
                       [0, 1, 1, 1, 0]])
    assert expert_vision_mask(tt).int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]]
    two = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 0]])
    assert expert_vision_mask(two).int().tolist() == [[0, 1, 1, 1, 0, 0, 1, 1, 0, 0]]
    assert build_position_ids(two).tolist() == [[0, 1, 2, 2, 3, 4, 5, 6, 7, 8]]


def test_all_text_all_image():
    assert not expert_vision_mask(torch.zeros(2, 6, dtype=torch.long)).any()
    allimg = torch.ones(1, 5, dtype=torch.long)
    assert expert_vision_mask(allimg).int().tolist() == [[1, 1, 1, 1, 0]]
    # first token is boi (relabelled language), last is eoi
    assert build_position_ids(allimg).tolist() == [[0, 1, 1, 1, 2]]
    plan = RoutingPlan.build(torch.zeros(2, 3, dtype=torch.long))
    assert plan.expert_counts.tolist() == [0, 6] and plan.expert_offsets.tolist() == [0, 0, 6]


def test_padding_hf_semantics():
    tt = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    # masked positions count as type -1 (HF): they stay at 0 and the first real token (bos) gets 1
    assert build_position_ids(tt, left.bool()).tolist() == [[0, 0, 1, 2, 3, 4, 5, 6]]
    right = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    text_end = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0]])
    assert build_position_ids(text_end, right.bool()).tolist() == [[0, 1, 2, 3, 4, 5, 5, 5]]
    # HF quirk kept on purpose: an image cut by right padding has no eoi (a pad is type -1, not language)
    assert build_position_ids(tt, right.bool()).tolist() == [[0, 1, 2, 3, 4, 4, 4, 4]]
    plan = RoutingPlan.build(tt, left)
    assert plan.seq_lens.tolist() == [6] and plan.cu_seqlens.tolist() == [0, 6]
    assert plan.host_counts == (2, 6, 6)


def test_image_span_ids_and_packed():
    tt = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]])
    plan = RoutingPlan.build(tt)
    assert plan.image_span_ids.tolist() == [[0, 1, 1, 0, 2, 2, 2, 0]]
    packed = RoutingPlan.build(torch.tensor([0, 1, 1, 1, 1, 1, 0, 0]), cu_seqlens=torch.tensor([0, 4, 8]))
    # the rule and positions restart per sequence; token 3 is last of sequence 0 -> language
    assert packed.vision_mask.int().tolist() == [[0, 1, 1, 0, 1, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed.image_span_ids.tolist() == [[0, 1, 1, 1, 2, 2, 0, 0]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.data())
def test_plan_invariants(batch, length, data):
    flat = data.draw(st.lists(st.integers(0, 1), min_size=batch * length, max_size=batch * length))
    tt = torch.tensor(flat).view(batch, length)
    pad_side = data.draw(st.sampled_from(["none", "left", "right"]))
    mask = None
    if pad_side != "none":
        lens = data.draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
        mask = torch.zeros(batch, length, dtype=torch.long)
        for b, n in enumerate(lens):
            if pad_side == "left":
                mask[b, length - n:] = 1
            else:
                mask[b, :n] = 1
    plan = RoutingPlan.build(tt, mask)
    T = batch * length
    assert sorted(plan.perm.tolist()) == list(range(T))                      # bijection
    assert (plan.inv_perm[plan.perm] == torch.arange(T)).all()
    nv = int(plan.vision_mask.sum())
    assert plan.expert_offsets.tolist() == [0, nv, T]
    routed_vision = plan.vision_mask.reshape(-1)[plan.perm]
    assert routed_vision[:nv].all() and not routed_vision[nv:].any()         # vision rows first
    assert (plan.perm[:nv].diff() > 0).all() and (plan.perm[nv:].diff() > 0).all()  # stable
    x = torch.randn(batch, length, 3)
    assert torch.equal(plan.unpermute(plan.permute(x)), x)                   # round trip
    assert torch.equal(plan.permute(x.reshape(T, 3)), plan.permute(x))
    assert torch.equal(plan.routed_position_ids, plan.position_ids.reshape(-1)[plan.perm])


def test_bad_inputs():
    with pytest.raises(TypeError, match="token_type_ids"):
        RoutingPlan.build(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="token_type_ids"):
        RoutingPlan.build(torch.tensor([[0, 2, 1]]))
    with pytest.raises(ValueError, match="token_type_ids"):
        RoutingPlan.build(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        RoutingPlan.build(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        RoutingPlan.build(torch.zeros(1, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 5]))
    plan = RoutingPlan.build(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="x must have shape"):
        plan.permute(torch.randn(5, 4))
    with pytest.raises(ValueError, match="routed order"):
        plan.unpermute(torch.randn(5, 4))
