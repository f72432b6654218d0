"""ZeRO-3-style parameter gathering: a patched model (its fused layers read ``.weight`` of submodules they never call)
gives the unpatched model's loss and gradients when parameters exist only inside their owner's forward/backward
(tests/upstream/zero3.py emulates DeepSpeed ZeRO-3 incl. leaf modules; DeepSpeed is not installed here)."""
import copy

import pytest

from upstream.models import make_batch, make_model
from upstream.zero3 import Zero3Double
from vexpert_kernels.integrations import patch_cogvlm
from vexpert_kernels.testing import rel_err


def _loss_and_grads(model, kw, keep, zero3):
    double = Zero3Double(model) if zero3 else None
    logits, _ = model(**kw)
    loss = logits[keep].float().pow(2).mean()
    loss.backward()
    if double is not None:
        assert double.gathers > 0
        double.materialize()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind,lora", [("cogvlm2", False), ("cogagent", True)])
def test_patched_model_under_zero3_double(kind, lora):
    base = make_model(kind).train()
    if lora:
        peft = pytest.importorskip("peft")
        base = peft.inject_adapter_in_model(
            peft.LoraConfig(r=2, target_modules=["language_expert_query_key_value", "vision_expert_dense", "up_proj"],
                            init_lora_weights=False), base)
        for n, p in base.named_parameters():
            p.requires_grad_("lora_" in n)
    kw, keep = make_batch(base, "left")
    loss_ref, grads_ref = _loss_and_grads(copy.deepcopy(base), kw, keep, zero3=False)
    # the double itself is faithful: the unpatched model under it gives the same numbers
    loss_hf, grads_hf = _loss_and_grads(copy.deepcopy(base), kw, keep, zero3=True)
    assert abs(loss_hf - loss_ref) <= 1e-6 * abs(loss_ref)
    patched = copy.deepcopy(base)
    patch_cogvlm(patched, backend="torch")
    loss, grads = _loss_and_grads(patched, kw, keep, zero3=True)
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        assert rel_err(grads[name], g) < 1e-4, name


def test_without_leaf_flag_the_double_bites():
    """Control: un-flag the fused layers and the same run fails (the layer reads weights it never gathered)."""
    model = make_model("cogvlm2").train()
    kw, keep = make_batch(model, "left")
    patch_cogvlm(model, backend="torch")
    for layer in model.model.layers:
        layer._z3_leaf = False
    with pytest.raises(Exception):
        _loss_and_grads(model, kw, keep, zero3=True)
