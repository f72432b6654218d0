"""attn_implementation="vexpert" on tiny transformers decoder models built from configs (no downloads).

Oracle: the same model with attn_implementation="sdpa" and the same weights. fp32 on CPU, our "math" backend (its own
masking, not sdpa's) for the families, plus one tiny case through the Triton kernel under the interpreter.
"""
import copy
import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vexpert_kernels.integrations.transformers import attention_function, compress_mask, register  # noqa: E402

VOCAB = 61
TOL = 2e-5  # fp32: both sides are fp32 attention, only the summation order differs


def _config(family, hidden=32, heads=4, kv_heads=2, layers=2, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                  pad_token_id=0, tie_word_embeddings=False)
    if family == "llama":
        return transformers.LlamaConfig(**common, **extra)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, **extra)
    if family == "mistral":
        return transformers.MistralConfig(**common, **{"sliding_window": None, **extra})
    raise ValueError(family)


# transformers >= 5.2x renamed past_key_values to cache (the old name warns)
_CACHE_KW = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters \
    else "past_key_values"


def _dynamic_cache(config):
    """DynamicCache(config=...) (transformers >= 4.56); older versions take no config."""
    if "config" in inspect.signature(transformers.DynamicCache.__init__).parameters:
        return transformers.DynamicCache(config=config)
    return transformers.DynamicCache()


_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _pair(family, impl, **cfg_kw):
    """(sdpa model, vexpert model) with identical weights."""
    cls = getattr(transformers, _CLASSES[family])
    cfg = _config(family, **cfg_kw)
    # each model gets its own config: _from_config keeps the object, and setting one model's attn_implementation
    # would otherwise switch the oracle too
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == impl and ref.config._attn_implementation == "sdpa"
    return ref, ours


@pytest.fixture(scope="module")
def impl_math():
    return register("vexpert_math", backend="math")


def _left_padded(B=3, L=9):
    ids = torch.randint(1, VOCAB, (B, L))
    am = torch.ones(B, L, dtype=torch.long)
    am[0, :4] = 0
    am[1, :1] = 0
    return ids, am


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_padded_logits_and_grads_match_sdpa(family, impl_math):
    ref, ours = _pair(family, impl_math)
    ids, am = _left_padded()
    keep = am.bool()
    outs = []
    for model in (ref, ours):
        model.zero_grad()
        logits = model(ids, attention_mask=am).logits
        (logits[keep] * torch.linspace(-1, 1, VOCAB)).sum().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = outs
    assert torch.isfinite(lb[keep]).all()
    assert (la[keep] - lb[keep]).abs().max() < TOL
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= TOL * max(1.0, ga[n].abs().max()), n
    # padding matters here: without the registered mask function this difference would be large
    unpadded = ours(ids).logits.detach()
    assert (unpadded[0, 4:] - lb[0, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_generate_identical_with_cache(family, impl_math):
    ref, ours = _pair(family, impl_math)
    ids, am = _left_padded()
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    a = ref.generate(ids, **{_CACHE_KW: _dynamic_cache(ref.config)}, **kw)
    b = ours.generate(ids, **{_CACHE_KW: _dynamic_cache(ours.config)}, **kw)
    assert torch.equal(a, b)
    # the decode steps ran against the cache (Lq=1 < Lk): continue one step by hand and compare logits too
    cache_a, cache_b = _dynamic_cache(ref.config), _dynamic_cache(ours.config)
    with torch.no_grad():
        ref(ids, attention_mask=am, use_cache=True, **{_CACHE_KW: cache_a})
        ours(ids, attention_mask=am, use_cache=True, **{_CACHE_KW: cache_b})
        nxt = torch.randint(1, VOCAB, (ids.shape[0], 2))
        am2 = torch.cat([am, torch.ones(ids.shape[0], 2, dtype=am.dtype)], 1)
        la = ref(nxt, attention_mask=am2, **{_CACHE_KW: cache_a}).logits
        lb = ours(nxt, attention_mask=am2, **{_CACHE_KW: cache_b}).logits
    assert (la - lb).abs().max() < TOL


def test_static_cache_and_custom_4d_mask(impl_math):
    """StaticCache (keys longer than the sequence so far) and a caller's own 4-D mask: served exactly via the mask."""
    ref, ours = _pair("llama", impl_math)
    ids, am = _left_padded()
    kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(ref.generate(ids, **kw), ours.generate(ids, **kw))
    m4 = torch.ones(3, 1, 9, 9, dtype=torch.bool).tril() & am.bool()[:, None, None, :]
    m4[2, 0, 5, 2] = False  # not expressible as causal + padding
    with torch.no_grad():
        la, lb = ref(ids, attention_mask=m4).logits, ours(ids, attention_mask=m4).logits
    assert (la - lb)[am.bool()].abs().max() < TOL


def test_sliding_window_served_exactly(impl_math):
    ref, ours = _pair("mistral", impl_math, sliding_window=4)
    _, full = _pair("mistral", impl_math, sliding_window=None)
    full.load_state_dict(ours.state_dict())
    ids, am = _left_padded()
    keep = am.bool()
    with torch.no_grad():
        la, lb = ref(ids, attention_mask=am).logits, ours(ids, attention_mask=am).logits
        lfull = full(ids, attention_mask=am).logits
    assert (la - lb)[keep].abs().max() < TOL
    assert (lfull - lb)[keep].abs().max() > 1e-3  # the window (4 < 9 tokens) really cut something


def test_bf16_within_twice_sdpa_error(impl_math):
    """bf16: our error vs the fp32 model is at most 2x sdpa's own bf16 error (+ a floor for tiny errors)."""
    ref, ours = _pair("llama", impl_math)
    ids, am = _left_padded()
    keep = am.bool()
    with torch.no_grad():
        gold = ref(ids, attention_mask=am).logits[keep]
        ref.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        e_sdpa = (ref(ids, attention_mask=am).logits[keep].float() - gold).abs().max()
        e_ours = (ours(ids, attention_mask=am).logits[keep].float() - gold).abs().max()
    assert e_ours <= 2 * e_sdpa + 1e-2, (e_ours, e_sdpa)


def _spy_varlen(monkeypatch):
    import vexpert_kernels.ops as ops

    calls = []
    real = ops.mixed_attention_varlen

    def spy(*a, **k):
        calls.append(a[3].tolist())
        return real(*a, **k)

    monkeypatch.setattr(ops, "mixed_attention_varlen", spy)
    return calls


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_batch_equals_one_by_one(flash_kwargs, impl_math, monkeypatch):
    _, model = _pair("qwen2", impl_math)
    seqs = [torch.randint(1, VOCAB, (n,)).tolist() for n in (5, 1, 7, 3)]
    collator = transformers.DataCollatorWithFlattening
    if "return_flash_attn_kwargs" in inspect.signature(collator.__init__).parameters:
        batch = collator(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s} for s in seqs])
    else:  # transformers < 4.49: position_ids only; the flash kwargs are what newer collators add
        batch = collator()([{"input_ids": s} for s in seqs])
        if flash_kwargs:
            cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    calls = _spy_varlen(monkeypatch)
    packed = model(**inputs).logits[0]
    assert calls and calls[0] == [0, 5, 6, 13, 16]   # every layer took the varlen path with the right boundaries
    start = 0
    for s in seqs:
        alone = model(torch.tensor([s])).logits[0]
        assert (packed[start:start + len(s)] - alone).abs().max() < TOL
        start += len(s)
    packed.sum().backward()  # packed training step: backward runs through the varlen path
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_triton_backend_tiny(caplog):
    """One tiny padded case through our Triton kernel (interpreter on CPU), forward and backward."""
    from vexpert_kernels._triton_compat import HAS_TRITON, interpret_mode

    if not HAS_TRITON or not (torch.cuda.is_available() or interpret_mode()):
        pytest.skip("needs triton (TRITON_INTERPRET=1 on CPU)")
    impl = register("vexpert_triton", backend="triton")
    ref, ours = _pair("llama", impl, hidden=32, heads=2, kv_heads=1, layers=1)
    ids = torch.randint(1, VOCAB, (2, 5))
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    keep = am.bool()
    la = ref(ids, attention_mask=am).logits
    with caplog.at_level("WARNING", logger="vexpert_kernels"):
        lb = ours(ids, attention_mask=am).logits
    assert "cannot serve" not in caplog.text  # triton itself served it, no fallback
    assert (la[keep] - lb[keep]).abs().max() < 1e-4
    la[keep].sum().backward()
    lb[keep].sum().backward()
    w = "model.layers.0.self_attn.q_proj.weight"
    ga, gb = dict(ref.named_parameters())[w].grad, dict(ours.named_parameters())[w].grad
    assert (ga - gb).abs().max() < 1e-4 * max(1.0, ga.abs().max())


def _qkv(B=1, H=4, KV=2, L=5, hd=16, **kw):
    return (torch.randn(B, H, L, hd, **kw), torch.randn(B, KV, L, hd, **kw), torch.randn(B, KV, L, hd, **kw))


class _Mod(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("kwargs,needle", [
    (dict(dropout=0.1), "dropout"),
    (dict(softcap=30.0), "softcap"),
    (dict(s_aux=torch.zeros(4)), "sinks"),
    (dict(output_attentions=True), "output_attentions"),
])
def test_unsupported_requests_are_refused_by_name(kwargs, needle):
    fn = attention_function("math")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=needle):
        fn(_Mod(), q, k, v, None, scaling=0.25, **kwargs)


def test_packed_kwargs_checked_against_the_mask():
    """cu_seq_lens_* that contradict transformers' mask raise; matching ones take the varlen path = per sequence."""
    fn = attention_function("math")
    q, k, v = _qkv(L=6)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    seg = torch.tensor([0, 0, 1, 1, 1, 1])
    keep = (seg[:, None] == seg[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    kw = dict(scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    out, _ = fn(_Mod(), q, k, v, keep[None, None], **kw)
    for a, b in ((0, 2), (2, 6)):
        alone, _ = fn(_Mod(), q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, scaling=0.25)
        assert (out[:, a:b] - alone).abs().max() < 1e-6
    wrong = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="disagree"):
        fn(_Mod(), q, k, v, keep[None, None], **dict(kw, cu_seq_lens_q=wrong, cu_seq_lens_k=wrong))
    with pytest.raises(ValueError, match="non-causal"):
        fn(_Mod(), q, k, v, None, scaling=0.25, is_causal=False)


def test_attention_dropout_in_training_refused(impl_math):
    _, model = _pair("llama", impl_math, attention_dropout=0.1)
    model.train()
    with pytest.raises(ValueError, match="attention_dropout"):
        model(torch.randint(1, VOCAB, (1, 4)))
    model.eval()
    model(torch.randint(1, VOCAB, (1, 4)))  # eval: dropout is 0, served


def test_head_dim_beyond_backend_falls_back(caplog):
    """hd=160 > triton's 128: another backend serves it (one log line), never a crash; same numbers as math."""
    fn = attention_function("triton")
    q, k, v = _qkv(B=2, hd=160)
    kpm = torch.tensor([[False, True, True, True, True], [True] * 5])
    with caplog.at_level("WARNING", logger="vexpert_kernels"):
        out, weights = fn(_Mod(), q, k, v, kpm, scaling=160 ** -0.5)
    assert weights is None and out.shape == (2, 5, 4, 160)
    assert "cannot serve" in caplog.text
    gold, _ = attention_function("math")(_Mod(), q, k, v, kpm, scaling=160 ** -0.5)
    assert (out - gold).abs().max() < 1e-5


def test_compress_mask_forms():
    causal = torch.ones(3, 5, dtype=torch.bool).tril(2)
    assert compress_mask(causal.expand(2, 1, 3, 5)) is None
    kpm = torch.tensor([[False, True, True, True, True], [True] * 5])
    got = compress_mask(causal[None, None] & kpm[:, None, None, :])
    assert torch.equal(got, kpm)
    window = causal.clone()
    window[2, 0] = False
    m = window.expand(2, 1, 3, 5)
    assert compress_mask(m) is m


def test_import_without_transformers_and_clear_register_error():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import vexpert_kernels.integrations.transformers as t\n"
            "try:\n    t.register()\nexcept ImportError as e:\n    print('ImportError', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ImportError" in r.stdout and "transformers" in r.stdout


def _fake_transformers(monkeypatch, version, **modeling_utils_attrs):
    """Stand-in ``transformers`` package of an older version (only what register() looks at)."""
    import types

    pkg = types.ModuleType("transformers")
    pkg.__version__ = version
    pkg.__path__ = []
    mu = types.ModuleType("transformers.modeling_utils")
    for k, v in modeling_utils_attrs.items():
        setattr(mu, k, v)
    pkg.modeling_utils = mu
    monkeypatch.setitem(sys.modules, "transformers", pkg)
    monkeypatch.setitem(sys.modules, "transformers.modeling_utils", mu)
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)  # < 4.53: no mask interface


def test_register_on_transformers_without_attention_interface(monkeypatch):
    """4.48/4.49 style: no AttentionInterface, a plain ALL_ATTENTION_FUNCTIONS dict; no mask interface, so the
    registered function serves the model's own 4-D masks (exact_masks=False)."""
    table = {"sdpa": object()}
    _fake_transformers(monkeypatch, "4.48.3", ALL_ATTENTION_FUNCTIONS=table)
    assert register("vexpert_old", backend="math") == "vexpert_old"
    fn = table["vexpert_old"]
    assert fn.keywords == {"backend": "math", "exact_masks": False}


def test_register_on_too_old_transformers_names_the_version(monkeypatch):
    _fake_transformers(monkeypatch, "4.46.0")
    with pytest.raises(ImportError, match=r"transformers >= 4\.48.*4\.46\.0"):
        register("vexpert_too_old")


def test_binary_from_additive():
    from vexpert_kernels.integrations.transformers import binary_from_additive

    keep = torch.ones(2, 1, 3, 5, dtype=torch.bool).tril(2)
    keep[0, ..., 0] = False
    for dtype in (torch.float32, torch.bfloat16):
        add = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
        assert torch.equal(binary_from_additive(add), keep)
        add[1, 0, 0, 4] = float("-inf")  # min + min overflows to -inf in some model code: still "drop"
        assert binary_from_additive(add)[1, 0, 0, 4].item() is False
    alibi = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    alibi[..., 1] = -0.5  # a real bias stays additive
    assert binary_from_additive(alibi) is alibi


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_rows_under_a_plain_causal_mask_without_mask_interface(how):
    """transformers < 4.53 hands a plain causal (0/min) mask for packed rows; like its flash_attention_2 path we
    split them by position_ids / cu_seq_lens. With the mask interface (exact_masks=True) such a mask is obeyed."""
    old, new = attention_function("math", exact_masks=False), attention_function("math")
    q, k, v = _qkv(L=6)
    causal = torch.zeros(1, 1, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), torch.finfo().min)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    kw = dict(scaling=0.25)
    if how == "position_ids":
        kw["position_ids"] = torch.tensor([[0, 1, 0, 1, 2, 3]])
    else:
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    out, _ = old(_Mod(), q, k, v, causal, **kw)
    for a, b in ((0, 2), (2, 6)):
        alone, _ = old(_Mod(), q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, scaling=0.25)
        assert (out[:, a:b] - alone).abs().max() < 1e-6
    if how == "position_ids":
        whole, _ = new(_Mod(), q, k, v, causal, **kw)
        plain, _ = new(_Mod(), q, k, v, None, scaling=0.25)
        assert (whole - plain).abs().max() < 1e-6 and (whole[:, 2:] - out[:, 2:]).abs().max() > 1e-3
    else:
        with pytest.raises(ValueError, match="disagree"):
            new(_Mod(), q, k, v, causal > -1, **kw)
