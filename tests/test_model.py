"""The model of docs/model.md: shapes, presets, windows, cached decoding, PoE objectives."""

import math

import pytest
import torch
import torch.nn.functional as F

import poelm.model as model_module
from conftest import tiny_config, tiny_model
from poelm.model import GPT, GPTConfig, KVCache, StepPlan, apply_rotary, rmsnorm, softcap, window_mask
from poelm.presets import get_preset


@pytest.mark.parametrize("name,tensors,params", [
    ("bp-1.3b", 175, 1_384_122_122),
    ("poe-1.3b", 175, 1_384_122_122),
    ("poe-1.5b", 179, 1_507_591_082),
    ("poe-3b", 235, 3_019_900_506),
])
def test_preset_counts_on_meta(name, tensors, params):
    with torch.device("meta"):
        model = GPT(get_preset(name))
    assert len(list(model.parameters())) == tensors
    assert model.num_params() == params


def test_d24_shape_facts():
    cfg = get_preset("poe-1.3b")
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim) == (1536, 12, 128)
    assert cfg.stage_ends == [5, 11, 17, 23]
    windows = cfg.window_sizes()
    assert [i for i, w in enumerate(windows) if w == 2048] == [3, 7, 11, 15, 19, 23]
    assert set(windows) == {512, 2048}
    assert [i for i in range(24) if cfg.has_value_embed(i)] == list(range(1, 24, 2))
    with torch.device("meta"):
        model = GPT(cfg)
    assert abs(model.flops_per_token(training_heads=False) - 4.78e9) / 4.78e9 < 0.01
    ve = sum(p.numel() for p in model.value_embeds.parameters())
    assert round(ve / model.num_params(), 2) == 0.44
    assert cfg.backout is False and get_preset("bp-1.3b").backout is True


def test_last_layer_always_long():
    cfg = tiny_config(n_layer=3, window_pattern="S", poe_every=None, poe_stage_layers=(1, 2))
    assert cfg.window_sizes() == [8, 8, 64]


@pytest.mark.parametrize("bad,match", [
    (dict(poe_stage_layers=(1, 2)), "sum to n_layer"),
    (dict(window_pattern="SXL"), "S and L"),
    (dict(poe_mode="magic"), "poe_mode"),
    (dict(poe_every=3), "does not divide"),
    (dict(n_head=3), "divisible"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_unknown_config_field():
    with pytest.raises(ValueError, match="unknown config field"):
        GPTConfig.from_dict({"n_layer": 2, "n_embd": 64, "n_head": 2, "frobnicate": 1})


def test_config_roundtrip():
    cfg = tiny_config(poe_every=None, poe_stage_layers=(1, 3), per_stage_head=True)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_window_mask_brute_force():
    for window in (0, 1, 3, 8):
        mask = window_mask(torch.arange(12), torch.arange(12), window)
        for q in range(12):
            for k in range(12):
                assert bool(mask[q, k]) == (q - window <= k <= q)


def _reference_attention(attn, x, ve, window):
    """Per-query loop over the keys t-window ... t (docs/model.md), no masks."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.c_q(x).view(B, T, H, D)
    k = attn.c_k(x).view(B, T, Hkv, D)
    v = attn.c_v(x).view(B, T, Hkv, D)
    if ve is not None:
        v = v + 3 * torch.sigmoid(attn.ve_gate(x[..., :12])).unsqueeze(-1) * ve.view(B, T, Hkv, D)
    inv = 1 / 100000 ** (torch.arange(0, D, 2).float() / D)
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    q = rmsnorm(apply_rotary(q, cos, sin)) * 1.2
    k = rmsnorm(apply_rotary(k, cos, sin)) * 1.2
    out = torch.zeros(B, T, H, D)
    for t in range(T):
        lo = max(0, t - window)
        for h in range(H):
            kv = h // (H // Hkv)
            scores = (q[:, t, h] @ k[:, lo:t + 1, kv].transpose(-1, -2).squeeze(0) if B == 1 else
                      torch.einsum("bd,bsd->bs", q[:, t, h], k[:, lo:t + 1, kv])) / math.sqrt(D)
            p = scores.softmax(-1)
            out[:, t, h] = torch.einsum("bs,bsd->bd", p.view(B, -1), v[:, lo:t + 1, kv])
    return attn.c_proj(out.reshape(B, T, H * D))


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_attention_matches_brute_force_window(layer):
    model = tiny_model()
    attn = model.transformer.h[layer].attn
    x = torch.randn(2, 20, 64)
    ve = model.value_embeds[str(layer)](torch.randint(0, 300, (2, 20))) if str(layer) in model.value_embeds else None
    window = model.windows[layer]
    plan = StepPlan(model, 2, 20, x.dtype, x.device, None, 0, {window})
    ref = _reference_attention(attn, x, ve, window)
    assert (attn(x, ve, plan, window) - ref).abs().max().item() < 1e-5  # separate q/k/v (training path)
    with torch.no_grad():  # fused q/k/v (inference path)
        assert (attn(x, ve, plan, window) - ref).abs().max().item() < 1e-5


def _decode_all(model, idx, chunks):
    cache = model.new_cache(idx.shape[0], 64)
    out, start = [], 0
    for size in chunks:
        out.append(model.forward_cached(idx[:, start:start + size], cache))
        start += size
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("chunks", [[1] * 40, [13] + [1] * 27, [5, 9, 3, 17, 6], [40]])
def test_cached_decoding_equals_full_forward(chunks):
    model = tiny_model(per_stage_head=True)
    idx = torch.randint(0, 300, (2, 40))  # 40 > window 8: crosses the S boundary many times
    full = model(idx)
    cached, _ = _decode_all(model, idx, chunks)
    assert (cached - full).abs().max().item() <= 1e-5


def test_cached_decoding_bp_backout_and_stage():
    model = tiny_model(poe_mode="none")
    assert model.config.backout
    with torch.no_grad():
        model.backout_lambda.fill_(0.3)
        model.smear_lambda.fill_(0.7)  # make the smear matter
    idx = torch.randint(0, 300, (1, 30))
    full, stage_logits = model(idx, return_stage_logits=True)
    cached, _ = _decode_all(model, idx, [7] + [1] * 23)
    assert (cached - full).abs().max().item() <= 1e-5
    cache = model.new_cache(1, 64)
    s1 = torch.cat([model.forward_cached(idx[:, t:t + 1], cache, stage=1) for t in range(30)], 1)
    assert (s1 - stage_logits[1]).abs().max().item() <= 1e-5
    assert cache.lengths[:2] == [30, 30] and cache.lengths[2:] == [0, 0]


def test_left_padded_rows_match_single_rows():
    model = tiny_model()
    a, b = torch.randint(0, 300, (1, 25)), torch.randint(0, 300, (1, 18))
    pad = torch.tensor([0, 7])
    idx = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    cache = KVCache(model.config, 2, 64, pad=pad)
    logits = model.forward_cached(idx, cache)
    assert (logits[0] - model(a)[0]).abs().max() <= 1e-5
    assert (logits[1, 7:] - model(b)[0]).abs().max() <= 1e-5


def test_cache_rows_join_and_leave_in_place():
    model = tiny_model()
    a, b = KVCache(model.config, 2, 64), KVCache(model.config, 1, 64)
    model.forward_cached(torch.randint(0, 300, (2, 10)), a)
    model.forward_cached(torch.randint(0, 300, (1, 6)), b)
    rows = lambda c: [(k[:, :, :10].clone(), v[:, :, :10].clone(), tok.clone()) for k, v, tok in
                      zip(torch.stack(c.k, 1), torch.stack(c.v, 1), c.tokens)]  # per row: K/V up to slot 10
    ref = rows(a) + rows(b) + rows(b)
    a.append_rows(b)  # 3 rows: the buffers grow to 4
    ptr = a.k[0].data_ptr()
    a.append_rows(b)  # into the free row slot: no new buffer
    assert a.batch_size == 4 and a.k[0].data_ptr() == ptr
    for index in ([0, 2, 3], [2, 0], [0]):  # a middle row leaves, then a reorder, then the last leaves
        ref = [ref[j] for j in index]
        a.keep_rows(index)
        assert a.batch_size == len(index) and a.k[0].data_ptr() == ptr
        for (k, v, tok), (rk, rv, rtok) in zip(rows(a), ref):
            n = 10 if rtok[6:10].any() else 6  # the joined rows filled 6 slots
            assert torch.equal(k[:, :, :n], rk[:, :, :n]) and torch.equal(v[:, :, :n], rv[:, :, :n])
            assert torch.equal(tok, rtok)
    a.k = [t.clone() for t in a.k]  # replaced from outside (the HF cache's beam reorder): adopted
    a.append_rows(b)
    assert a.batch_size == 2 and torch.equal(a.k[1][1, :, :6], b.k[1][0, :, :6])


def test_smear_uses_previous_token():
    model = tiny_model()
    with torch.no_grad():
        model.smear_lambda.fill_(1.0)
    idx = torch.randint(0, 300, (1, 6))
    x = model.embed(idx)
    e = rmsnorm(model.transformer.wte(idx))
    gate = torch.sigmoid(model.smear_gate(e[0, 3, :24]))
    assert torch.allclose(x[0, 3], e[0, 3] + gate * e[0, 2], atol=1e-6)
    assert torch.equal(x[0, 0], e[0, 0])


def test_logits_are_capped_and_cut_to_vocab():
    model = tiny_model(vocab_size=250)  # padded to 256
    assert model.lm_head.weight.shape[0] == 256
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    logits = model(torch.randint(0, 250, (1, 5)))
    assert logits.shape[-1] == 250 and logits.abs().max() <= 15.0 and logits.dtype == torch.float32


# ----------------------------------------------------------------------------- objectives


def _naive_stage_losses(model, idx, targets):
    stage_x, x_mid = model.trunk(idx)
    return [F.cross_entropy(model.readout(x, k).flatten(0, 1), targets.flatten()) for k, x in enumerate(stage_x)]


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _block_grad_norm(grads, layers):
    total = 0.0
    for n, g in grads.items():
        if n.startswith("transformer.h.") and int(n.split(".")[2]) in layers and g is not None:
            total += g.abs().sum().item()
    return total


def test_flat_stage_loss_gives_no_gradient_to_earlier_stages():
    model = tiny_model(poe_mode="flat", per_stage_head=True)
    idx, tgt = torch.randint(0, 300, (2, 24)), torch.randint(0, 300, (2, 24))
    for j in range(1, 4):
        grads = _grads(model, _naive_stage_losses(model, idx, tgt)[j])
        assert _block_grad_norm(grads, range(0, j)) == 0.0  # earlier stages: exactly zero
        assert _block_grad_norm(grads, [j]) > 0
        assert grads["transformer.wte.weight"].abs().sum() > 0  # x0 path is not detached
        assert grads["smear_gate.weight"] is not None and grads["x0_lambdas"].abs().sum() > 0
    # the shared head gets gradient from every stage
    for j in range(4):
        grads = _grads(model, _naive_stage_losses(model, idx, tgt)[j])
        assert grads["lm_head.weight"].abs().sum() > 0


def test_hier_has_no_detach():
    model = tiny_model(poe_mode="hier")
    idx, tgt = torch.randint(0, 300, (2, 24)), torch.randint(0, 300, (2, 24))
    grads = _grads(model, _naive_stage_losses(model, idx, tgt)[3])
    assert _block_grad_norm(grads, [0, 1, 2]) > 0


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "7-chunks"])
@pytest.mark.parametrize("mode,alpha", [("flat", 0.0), ("flat", 0.5), ("flat", 1.0), ("hier", 0.0), ("none", 0.0)])
def test_loss_and_gradients_match_autograd_reference(mode, alpha, chunked, monkeypatch):
    model = tiny_model(poe_mode=mode, poe_alpha=alpha, per_stage_head=(mode == "flat"))
    idx, tgt = torch.randint(0, 300, (2, 24)), torch.randint(0, 300, (2, 24))
    tgt[0, :3] = -1  # ignored targets
    if chunked:  # the fused loss over 48 rows in chunks of 7 rows (7 chunks, the last one short)
        real, calls = model_module.softcap_cross_entropy, []

        def small_chunks(hidden, *a, **k):
            calls.append(hidden.shape[0])
            return real(hidden, *a, **{**k, "chunk_elems": 7 * 300})
        monkeypatch.setattr(model_module, "softcap_cross_entropy", small_chunks)
    loss, stage_losses = model(idx, tgt, return_stage_losses=True)
    if chunked:
        assert calls == [48] * (1 if mode == "none" else 4)
    grads = _grads(model, loss)
    if mode == "none":
        ref = F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten(), ignore_index=-1)
    else:
        stage_x, _ = model.trunk(idx)
        per = [F.cross_entropy(model.readout(x, k).flatten(0, 1), tgt.flatten(), ignore_index=-1)
               for k, x in enumerate(stage_x)]
        assert torch.allclose(stage_losses, torch.stack(per).detach(), atol=1e-5)
        ref = sum(per) / 4 ** (1 - alpha)  # the α scaling: mean, sqrt(K), plain sum
    assert torch.allclose(loss, ref, atol=1e-5)
    ref_grads = _grads(model, ref)
    for name, g in grads.items():
        if g is None:
            assert ref_grads[name] is None or ref_grads[name].abs().max() == 0, name
        else:
            assert (g - ref_grads[name]).abs().max() < 1e-5, name


def test_flat_alpha_scaling():
    model = tiny_model()
    idx, tgt = torch.randint(0, 300, (1, 16)), torch.randint(0, 300, (1, 16))
    values = {}
    for alpha in (0.0, 0.5, 1.0):
        model.config.poe_alpha = alpha
        loss, stage_losses = model(idx, tgt, return_stage_losses=True)
        values[alpha] = (loss.item(), stage_losses.sum().item())
    for alpha, (loss, total) in values.items():
        assert loss == pytest.approx(total / 4 ** (1 - alpha), rel=1e-5)


def test_residual_logop_objective():
    model = tiny_model(poe_mode="residual_logop")
    idx, tgt = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    loss = model(idx, tgt)
    grads = _grads(model, loss)
    stage_x, _ = model.trunk(idx)
    logp = [model.readout(x, k).log_softmax(-1) for k, x in enumerate(stage_x)]
    per = []
    for k in range(4):
        running = (sum(l.detach() for l in logp[:k]) + logp[k]) / (k + 1)
        per.append(F.cross_entropy(running.flatten(0, 1), tgt.flatten()))
    ref = sum(per) / 4
    assert torch.allclose(loss, ref, atol=1e-5)
    ref_grads = _grads(model, ref)
    for name, g in grads.items():
        if g is not None:
            assert (g - ref_grads[name]).abs().max() < 1e-5, name
    # the stage-3 term alone never reaches the blocks of earlier stages
    stage_x, _ = model.trunk(idx)
    g3 = _grads(model, F.cross_entropy(model.readout(stage_x[3], 3).flatten(0, 1), tgt.flatten()))
    assert _block_grad_norm(g3, [0, 1, 2]) == 0.0


def test_backout_never_in_poe_losses():
    model = tiny_model(poe_mode="flat")
    idx, tgt = torch.randint(0, 300, (1, 16)), torch.randint(0, 300, (1, 16))
    grads = _grads(model, model(idx, tgt))
    assert grads["backout_lambda"] is None
    bp = tiny_model(poe_mode="none")
    assert _grads(bp, bp(idx, tgt))["backout_lambda"].abs().sum() > 0


def test_token_nats_match_readouts():
    model = tiny_model()
    idx, tgt = torch.randint(0, 300, (2, 20)), torch.randint(0, 300, (2, 20))
    nats = model.token_nats(idx, tgt)
    logits, stage_logits = model(idx, return_stage_logits=True)
    ref_final = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view(2, 20)
    assert torch.allclose(nats["final"], ref_final, atol=1e-5)
    for k, z in enumerate(stage_logits):
        ref = F.cross_entropy(z.flatten(0, 1), tgt.flatten(), reduction="none").view(2, 20)
        assert torch.allclose(nats["stages"][k], ref, atol=1e-5)
    logop = sum(z.log_softmax(-1) for z in stage_logits) / 4
    ref = F.cross_entropy(logop.flatten(0, 1), tgt.flatten(), reduction="none").view(2, 20)
    assert torch.allclose(nats["logop"], ref, atol=1e-5)


@pytest.mark.parametrize("field, value", [("n_layer", "4"), ("n_layer", 4.0), ("n_layer", True), ("poe_alpha", "0.5"),
                                          ("per_stage_head", 1), ("window_pattern", 3), ("poe_stage_layers", [2, "2"]),
                                          ("final_readout", None), ("n_embd", [64])])
def test_from_dict_checks_field_types(field, value):
    d = {"n_layer": 4, "n_embd": 64, "n_head": 2, field: value}
    with pytest.raises(ValueError, match=f"^config field {field}=.* must be "):
        GPTConfig.from_dict(d)


def test_from_dict_accepts_json_spellings():
    cfg = GPTConfig.from_dict({"n_layer": 4, "n_embd": 64, "n_head": 2, "poe_alpha": 1, "n_kv_head": None,
                               "poe_every": None, "poe_stage_layers": [2, 2], "backout": True})
    assert cfg.poe_alpha == 1 and cfg.poe_stage_layers == (2, 2) and cfg.backout is True
    for bad in ([1, 2], None, "n_layer"):
        with pytest.raises(ValueError, match="must be a JSON object of fields"):
            GPTConfig.from_dict(bad)
    with pytest.raises(ValueError, match="final_readout 'mean'"):
        GPTConfig(n_layer=4, n_embd=64, n_head=2, final_readout="mean")


@pytest.mark.parametrize("alpha", [None, 0.0])
@torch.no_grad()
def test_logop_final_readout(alpha):
    model = tiny_model(per_stage_head=True, poe_alpha=0.5, final_readout="logop", final_logop_alpha=alpha).eval()
    idx = torch.randint(0, 300, (2, 20))
    final, stage_logits = model(idx, return_stage_logits=True)
    w = 1 / 4 ** (1 - (0.5 if alpha is None else alpha))  # the final Log-OP's own alpha, else poe_alpha
    assert torch.equal(final, w * sum(z.log_softmax(-1) for z in stage_logits))
    assert (model.forward_cached(idx, model.new_cache(2, 20)) - final).abs().max() <= 1e-5
    nats = model.token_nats(idx[:, :-1], idx[:, 1:])
    ref = -final[:, :-1].log_softmax(-1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    assert (nats["final"] - ref).abs().max() <= 1e-5
