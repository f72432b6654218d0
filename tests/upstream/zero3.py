"""A test double for DeepSpeed ZeRO-3 parameter partitioning (DeepSpeed itself is not a test dependency).

Like ZeRO-3, every parameter's data is an empty tensor except while the module that owns it runs: a forward pre-hook
gathers (restores the full tensor), a forward hook releases it again, and the module's outputs carry an autograd
node that gathers again when their gradient arrives (ZeRO-3's pre-backward hook). The owner of a parameter is the
module it is registered on — or, as in DeepSpeed, the nearest ancestor flagged as a ZeRO-3 *leaf module*
(``module._z3_leaf = True``, what ``deepspeed.utils.set_z3_leaf_modules`` sets), which then gathers its whole subtree.
A layer that reads ``.weight`` of a submodule it never calls sees an empty tensor unless it is such a leaf.
"""
from __future__ import annotations

import torch
from torch import nn


class _GatherOnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gather, *tensors):
        ctx.gather = gather
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.gather()
        return (None,) + grads


class Zero3Double:
    def __init__(self, model: nn.Module):
        self.full = {}
        self.handles = []
        self.gathers = 0
        inside_leaf = set()
        for name, mod in model.named_modules():
            if any(name.startswith(p + ".") for p in inside_leaf):
                continue
            leaf = bool(getattr(mod, "_z3_leaf", False))
            if leaf:
                inside_leaf.add(name)
            params = list(mod.parameters(recurse=leaf))
            if not params:
                continue
            for p in params:
                self.full[p] = p.data
            self.handles.append(mod.register_forward_pre_hook(self._pre(params)))
            self.handles.append(mod.register_forward_hook(self._post(params)))
        for p in self.full:
            self._release(p)

    def _release(self, p):
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def _gather_fn(self, params):
        def gather():
            self.gathers += 1
            for p in params:
                p.data = self.full[p]
        return gather

    def _pre(self, params):
        gather = self._gather_fn(params)

        def hook(module, args):
            gather()
        return hook

    def _post(self, params):
        gather = self._gather_fn(params)

        def hook(module, args, output):
            for p in params:
                self._release(p)
            if not torch.is_grad_enabled():
                return output
            return self._wrap(output, gather)
        return hook

    def _wrap(self, out, gather):
        if isinstance(out, torch.Tensor):
            return _GatherOnBackward.apply(gather, out) if out.requires_grad else out
        if isinstance(out, tuple):
            return tuple(self._wrap(o, gather) for o in out)
        return out

    def materialize(self):
        """Gather everything (e.g. to read gradients and compare); removes the hooks."""
        for h in self.handles:
            h.remove()
        for p, data in self.full.items():
            p.data = data
