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


def check_plan(plan, vision, positions, spans, perm, seq_lens, cu_seqlens, host_counts):
    """Every field of a plan against values written out by hand from COGVLM_SPEC.md."""
    T = len(perm)
    nv = sum(map(sum, vision))
    assert plan.vision_mask.int().tolist() == vision
    assert plan.language_mask.int().tolist() == [[1 - v for v in row] for row in vision]
    assert plan.position_ids.tolist() == positions
    assert plan.image_span_ids.tolist() == spans
    assert plan.perm.tolist() == perm
    assert plan.inv_perm[plan.perm].tolist() == list(range(T))
    assert plan.expert_counts.tolist() == [nv, T - nv]
    assert plan.expert_offsets.tolist() == [0, nv, T]
    flat_pos = [p for row in positions for p in row]
    assert plan.routed_position_ids.tolist() == [flat_pos[i] for i in perm]
    assert plan.seq_lens.tolist() == seq_lens
    assert plan.cu_seqlens.tolist() == cu_seqlens
    assert plan.host_counts == host_counts


def test_plan_build_spec_one_image():
    # [bos] [boi p p p p eoi] [text x3]: eoi -> language expert; bos 0, boi 1, patches 2, eoi 3, text 4..
    plan = RoutingPlan.build(torch.tensor([ONE_IMAGE]))
    check_plan(plan, vision=[[0, 1, 1, 1, 1, 1, 0, 0, 0, 0]], positions=[[0, 1, 2, 2, 2, 2, 3, 4, 5, 6]],
               spans=[[0, 1, 1, 1, 1, 1, 1, 0, 0, 0]], perm=[1, 2, 3, 4, 5, 0, 6, 7, 8, 9],
               seq_lens=[10], cu_seqlens=[0, 10], host_counts=(5, 5, 10))
    assert plan.attention_mask is None and plan.packed_cu_seqlens is None


def test_plan_build_spec_vision_last_in_row_and_several_images():
    # row 0: image runs to the row end -> its last token uses the language expert (and is eoi for positions)
    # row 1: two images back to back with one text token between
    tt = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0, 0],
                       [0, 1, 1, 1, 0, 1, 1, 0, 1, 1]])
    plan = RoutingPlan.build(tt)
    check_plan(plan,
               vision=[[0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 1, 0, 0, 1, 0]],
               positions=[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]],
               spans=[[0, 0, 1, 1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 2, 2, 0, 3, 3]],
               perm=[2, 3, 11, 12, 15, 18] + [0, 1, 4, 5, 6, 7, 8, 9, 10, 13, 14, 16, 17, 19],
               seq_lens=[10, 10], cu_seqlens=[0, 10, 20], host_counts=(6, 14, 10))
    # a longer image: every patch shares one position, the image costs 3 positions
    plan = RoutingPlan.build(torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0]]))
    assert plan.position_ids.tolist() == [[0, 1, 2, 2, 2, 2, 2, 3, 4, 5, 6, 7, 8]]
    assert plan.vision_mask.int().tolist() == [[0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0]]


def test_plan_build_spec_left_and_right_padding():
    tt = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0],
                       [0, 1, 1, 1, 0, 0, 0, 0],
                       [0, 0, 0, 1, 1, 1, 0, 0]])
    keep = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1],      # left padding: pads count as type -1, first real token 1
                         [1, 1, 1, 1, 1, 1, 0, 0],      # right padding: pads repeat the last position
                         [1, 1, 1, 1, 1, 1, 0, 0]])     # image cut by right padding: no eoi (a pad is not text)
    plan = RoutingPlan.build(tt, keep)
    check_plan(plan,
               # the expert rule sees raw token types, padding included (as HF)
               vision=[[0, 0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]],
               positions=[[0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 5, 5], [0, 1, 2, 3, 4, 4, 4, 4]],
               spans=[[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0]],
               perm=[3, 4, 9, 10, 19, 20] + [i for i in range(24) if i not in (3, 4, 9, 10, 19, 20)],
               seq_lens=[6, 6, 6], cu_seqlens=[0, 6, 12, 18], host_counts=(6, 18, 6))
    assert plan.attention_mask.tolist() == keep.bool().tolist()
    # HF quirk, literally from the spec: a vision token right after a left pad (type -1) is not boi -- it is neither
    # after language nor at column 0 -- so it and the next patch count 0 and only eoi/text advance
    p = RoutingPlan.build(torch.tensor([[0, 1, 1, 1, 0]]), torch.tensor([[0, 1, 1, 1, 1]]))
    assert p.position_ids.tolist() == [[0, 0, 0, 1, 2]]


def test_plan_build_spec_packed_sequences():
    # sequences [0 1 1] | [] | [1 1 1 0]: the rule and positions restart per sequence -- token 2 is last of its
    # sequence (language) although token 3 is vision; the empty sequence changes nothing
    tt = torch.tensor([[0, 1, 1, 1, 1, 1, 0]])
    plan = RoutingPlan.build(tt, cu_seqlens=torch.tensor([0, 3, 3, 7]))
    check_plan(plan, vision=[[0, 1, 0, 1, 1, 0, 0]], positions=[[0, 1, 2, 0, 1, 2, 3]],
               spans=[[0, 1, 1, 2, 2, 2, 0]], perm=[1, 3, 4, 0, 2, 5, 6],
               seq_lens=[7], cu_seqlens=[0, 3, 3, 7], host_counts=(3, 4, 4))
    assert plan.packed_cu_seqlens.tolist() == [0, 3, 3, 7] and plan.max_seqlen == 4
    # the same tokens unpacked are one sequence: tokens 1..5 form one image
    whole = RoutingPlan.build(tt)
    assert whole.vision_mask.int().tolist() == [[0, 1, 1, 1, 1, 0, 0]]
    assert whole.position_ids.tolist() == [[0, 1, 2, 2, 2, 3, 4]]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
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
