"""The reference layer against an independent per-token float64 loop written here (no reference helpers)."""
import math

import pytest
import torch

from vexpert_kernels import VisualExpertConfig
from vexpert_kernels.reference import VisionExpertAttention, VisionExpertMLP, VisualExpertBlock
from vexpert_kernels.testing import randomize_norms_and_biases, rel_err

HF_KEYS = {
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.vision_expert_query_key_value.weight", "self_attn.language_expert_query_key_value.weight",
    "self_attn.vision_expert_dense.weight", "self_attn.language_expert_dense.weight",
    "mlp.vision_mlp.gate_proj.weight", "mlp.vision_mlp.up_proj.weight", "mlp.vision_mlp.down_proj.weight",
    "mlp.language_mlp.gate_proj.weight", "mlp.language_mlp.up_proj.weight", "mlp.language_mlp.down_proj.weight",
    "self_attn.rotary_emb.inv_freq",
}


def loop_positions(types, keep):
    """HF position ids, one token at a time."""
    t = [ty if k else -1 for ty, k in zip(types, keep)]
    n = len(t)
    lab = list(t)
    for i in range(n):
        if t[i] == 1:
            boi = i == 0 or t[i - 1] == 0
            eoi = i == n - 1 or t[i + 1] == 0
            if boi or eoi:
                lab[i] = 0
    pos, cur = [0], 0
    for i in range(1, n):
        cur += int(lab[i] == 0 or (lab[i] == 1 and lab[i - 1] == 0))
        pos.append(cur)
    return pos


def loop_layer(sd, cfg, x, tt, keep, past=None, positions=None):
    """One CogVLM layer for one sample, token by token in float64. x [L, D]; tt, keep lists; past (k, v) lists."""
    D, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    L = x.shape[0]
    g = {k: v.double() for k, v in sd.items()}

    def norm(v, w):
        return w * (v / math.sqrt(float((v * v).mean()) + cfg.rms_norm_eps))

    def vision(i):
        return tt[i] == 1 and i + 1 < L and tt[i + 1] == 1

    def lin(name, i, v):
        e = "vision" if vision(i) else "language"
        w = g[name.format(e)]
        out = w @ v
        b = g.get(name.format(e).replace(".weight", ".bias"))
        return out + b if b is not None else out

    pos = positions if positions is not None else loop_positions(tt, keep)
    # HF computes inv_freq in fp32 (a buffer), then uses it as is
    inv = (1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))).double()

    def rope(v, p):  # v [hd]
        ang = p * inv
        c, s = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
        rot = torch.cat([-v[hd // 2:], v[:hd // 2]])
        return v * c + rot * s

    ks, vs = ([] if past is None else list(past[0])), ([] if past is None else list(past[1]))
    P = len(ks)
    keep_all = ([True] * P if past is None else past[2]) + list(keep)
    qs = []
    for i in range(L):
        h = norm(x[i], g["input_layernorm.weight"])
        qkv = lin("self_attn.{}_expert_query_key_value.weight", i, h)
        q, k, v = qkv[:H * hd].view(H, hd), qkv[H * hd:(H + KV) * hd].view(KV, hd), qkv[(H + KV) * hd:].view(KV, hd)
        qs.append(torch.stack([rope(q[j], pos[i]) for j in range(H)]))
        ks.append(torch.stack([rope(k[j], pos[i]) for j in range(KV)]))
        vs.append(v)
    out = torch.empty_like(x)
    for i in range(L):
        ctx = []
        for h_ in range(H):
            kv_h = h_ // (H // KV)
            allowed = [j for j in range(P + i + 1) if keep_all[j]]
            if not allowed:  # a padded query row before any real key: ignored by callers
                ctx.append(torch.zeros(hd, dtype=torch.float64))
                continue
            s = torch.stack([qs[i][h_] @ ks[j][kv_h] for j in allowed]) / math.sqrt(hd)
            p = torch.softmax(s, 0)
            ctx.append(sum(p[n] * vs[j][kv_h] for n, j in enumerate(allowed)))
        a = lin("self_attn.{}_expert_dense.weight", i, torch.cat(ctx))
        r = x[i] + a
        h2 = norm(r, g["post_attention_layernorm.weight"])
        gt = lin("mlp.{}_mlp.gate_proj.weight", i, h2)
        up = lin("mlp.{}_mlp.up_proj.weight", i, h2)
        out[i] = r + lin("mlp.{}_mlp.down_proj.weight", i, torch.nn.functional.silu(gt) * up)
    return out, (ks, vs, keep_all)


def make_block(cfg, seed=0):
    torch.manual_seed(seed)
    return randomize_norms_and_biases(VisualExpertBlock(cfg).double())


CASES = [
    ("mha_nobias", dict(num_key_value_heads=4, vision_qkv_bias=False)),
    ("gqa_vbias", dict()),
]


@pytest.mark.parametrize("name,over", CASES)
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_reference_vs_token_loop(name, over, pad):
    cfg = VisualExpertConfig.tiny(**over)
    blk = make_block(cfg)
    B, L = 2, 11
    tt = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0],      # two images
                       [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]])     # image at the row end
    keep = torch.ones(B, L, dtype=torch.long)
    if pad == "left":
        keep[0, :3] = 0
        keep[1, :1] = 0
    elif pad == "right":
        keep[0, -2:] = 0
    x = torch.randn(B, L, cfg.hidden_size, dtype=torch.float64)
    mask = None if pad == "none" else keep
    (y,) = blk(x, tt, attention_mask=mask)
    sd = blk.state_dict()
    for b in range(B):
        ref, _ = loop_layer(sd, cfg, x[b], tt[b].tolist(), keep[b].bool().tolist())
        rows = keep[b].bool()
        assert rel_err(y[b][rows], ref[rows]) < 1e-12
        assert torch.isfinite(y[b]).all()


def test_kv_cache_prefill_then_decode_equals_full():
    cfg = VisualExpertConfig.tiny()
    blk = make_block(cfg)
    tt = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 0]])
    x = torch.randn(1, 9, cfg.hidden_size, dtype=torch.float64)
    (full,) = blk(x, tt)
    pos = blk_pos = __import__("vexpert_kernels").build_position_ids(tt)
    y, cache = blk(x[:, :6], tt[:, :6], use_cache=True)
    outs = [y]
    for i in range(6, 9):
        y, cache = blk(x[:, i:i + 1], tt[:, i:i + 1], position_ids=pos[:, i:i + 1], past_key_value=cache,
                       use_cache=True)
        outs.append(y)
    assert cache[0].shape == (1, cfg.num_key_value_heads, 9, cfg.head_dim)  # KV heads, not expanded
    assert rel_err(torch.cat(outs, 1), full) < 1e-12
    # the per-token loop agrees on the decode step too
    ref, _ = loop_layer(blk.state_dict(), cfg, x[0], tt[0].tolist(), [True] * 9)
    assert rel_err(full[0], ref) < 1e-12
    assert blk_pos is pos


def test_4d_additive_mask_equals_2d_keep_mask():
    cfg = VisualExpertConfig.tiny()
    blk = make_block(cfg)
    tt = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]])
    keep = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    x = torch.randn(2, 6, cfg.hidden_size, dtype=torch.float64)
    (a,) = blk(x, tt, attention_mask=keep)
    neg = torch.finfo(torch.float64).min
    causal = torch.ones(6, 6).tril().bool()
    allowed = causal[None] & keep.bool()[:, None, :]
    m4 = torch.zeros(2, 1, 6, 6, dtype=torch.float64).masked_fill(~allowed[:, None], neg)
    pos = __import__("vexpert_kernels").build_position_ids(tt, keep.bool())
    (b,) = blk(x, tt, position_ids=pos, attention_mask=m4)
    rows = keep.bool()
    assert rel_err(b[rows], a[rows]) < 1e-13


def test_bidirectional_images_differ_only_inside_images():
    cfg = VisualExpertConfig.tiny()
    torch.manual_seed(1)
    causal = make_block(cfg)
    bidir = make_block(cfg.replace(image_attention="bidirectional"))
    bidir.load_state_dict(causal.state_dict())
    tt = torch.tensor([[0, 1, 1, 1, 1, 0, 0]])
    x = torch.randn(1, 7, cfg.hidden_size, dtype=torch.float64)
    (a,), (b,) = causal(x, tt), bidir(x, tt)
    assert torch.allclose(a[:, 0], b[:, 0]) and rel_err(b[:, 1:4], a[:, 1:4]) > 1e-3  # image rows changed
    # the last image token already sees the whole image under causal attention
    assert torch.allclose(a[:, 4], b[:, 4])


def test_state_dict_keys_and_hf_load():
    for cfg in (VisualExpertConfig.tiny(), VisualExpertConfig.tiny(vision_qkv_bias=False)):
        keys = set(VisualExpertBlock(cfg).state_dict())
        expect = set(HF_KEYS)
        if cfg.vision_qkv_bias:
            expect.add("self_attn.vision_expert_query_key_value.bias")
        assert keys == expect
    cfg = VisualExpertConfig.tiny()
    src = VisualExpertBlock(cfg)
    hf_dict = {k: torch.randn_like(v) if k != "self_attn.rotary_emb.inv_freq" else v for k, v in src.state_dict().items()}
    dst = VisualExpertBlock(cfg)
    dst.load_state_dict(hf_dict)
    assert torch.equal(dst.mlp.vision_mlp.down_proj.weight, hf_dict["mlp.vision_mlp.down_proj.weight"])


def test_submodules_usable_alone():
    cfg = VisualExpertConfig.tiny()
    tt = torch.tensor([[0, 1, 1, 0]])
    x = torch.randn(1, 4, cfg.hidden_size)
    mlp = VisionExpertMLP(cfg)
    y = mlp(x, tt)
    assert torch.allclose(y[0, 1], mlp.vision_mlp(x[0, 1]), atol=1e-6)
    assert torch.allclose(y[0, 2], mlp.language_mlp(x[0, 2]), atol=1e-6)   # eoi uses the language expert
    attn = VisionExpertAttention(cfg)
    out, weights, present = attn(x, tt, torch.arange(4)[None], use_cache=True)
    assert out.shape == x.shape and weights is None and present[0].shape == (1, 2, 4, 16)


def test_rope_hf_quirk_switch():
    cfg = VisualExpertConfig.tiny()
    quirk = cfg.replace(rope_position_dtype=torch.bfloat16)
    a, b = make_block(cfg).float(), make_block(quirk).float()
    L = 300
    tt = torch.zeros(1, L, dtype=torch.long)
    x = torch.randn(1, L, cfg.hidden_size)
    pos = torch.arange(L)[None]
    (ya,), (yb,) = a(x, tt, pos), b(x, tt, pos)
    assert torch.equal(ya[:, :257], yb[:, :257])     # bf16 represents integers up to 256 exactly
    assert not torch.equal(ya[:, 257:], yb[:, 257:])


def test_bad_inputs():
    cfg = VisualExpertConfig.tiny()
    blk = VisualExpertBlock(cfg)
    x = torch.randn(2, 5, cfg.hidden_size)
    tt = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="hidden_size"):
        blk(torch.randn(2, 5, 8), tt)
    with pytest.raises(ValueError, match="token_type_ids shape"):
        blk(x, tt[:1])
    with pytest.raises(TypeError, match="token_type_ids"):
        blk(x, tt.float())
    with pytest.raises(ValueError, match="token_type_ids"):
        blk(x, tt + 3)
    with pytest.raises(ValueError, match="attention_mask"):
        blk(x, tt, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="position_ids is required"):
        blk(x, tt, past_key_value=(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        VisualExpertConfig.tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_attention_heads"):
        VisualExpertConfig.tiny(hidden_size=66)
    with pytest.raises(ValueError, match="hidden_size"):
        VisualExpertConfig.tiny(hidden_size=0)
    with pytest.raises(ValueError, match="image_attention"):
        VisualExpertConfig.tiny(image_attention="full")


def test_reference_is_independent_of_the_code_under_test():
    """The oracle imports nothing from routing.py or ops/: a bug planted there cannot move the reference too."""
    import ast
    import vexpert_kernels.reference as reference_module

    tree = ast.parse(open(reference_module.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
            imported.update(f"{node.module}.{a.name}" for a in node.names if node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not any("routing" in m or m.startswith((".ops", "vexpert_kernels.ops")) or m == "." for m in imported), \
        imported


def test_reference_rules_match_the_token_loop():
    """The reference's expert rule and position ids vs the per-token loop above, on random layouts and padding."""
    from vexpert_kernels.reference import spec_position_ids, vision_expert_mask
    from vexpert_kernels.testing import random_token_types

    g = torch.Generator().manual_seed(5)
    for L in (1, 2, 3, 7, 19):
        tt = random_token_types(4, L, images_per_row=(0, 3), image_len=(1, 6), generator=g)
        tt[0] = 1
        keep = torch.ones(4, L, dtype=torch.bool)
        keep[1, :L // 2] = False          # left padding
        keep[2, L - L // 3:] = False      # right padding
        pos, vis = spec_position_ids(tt, keep), vision_expert_mask(tt)
        for b in range(4):
            types = tt[b].tolist()
            assert pos[b].tolist() == loop_positions(types, keep[b].tolist()), (types, keep[b].tolist())
            assert vis[b].tolist() == [types[i] == 1 and i + 1 < L and types[i + 1] == 1 for i in range(L)]
