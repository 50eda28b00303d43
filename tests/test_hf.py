"""The Hugging Face layout: `poelm export`, the remote code under transformers, tokenizer parity,
the released checkpoints' tensor inventory and bad input.

Tests named `test_client_*` only need transformers (any supported version) and poelm on the
path: tests/test_hf_tf457.py runs them again under transformers 4.57 in .venv-tf457.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network (before transformers is imported)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # transformers copies remote code into this cache: keep it inside the (ignored) .cache/ of the repo
    from importlib.metadata import version as _version

    os.environ.setdefault("HF_MODULES_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"
                                                  / f"hf_modules_{_version('transformers')}"))
except Exception:
    pass

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from poelm.checkpoint import load_model  # noqa: E402
from poelm.export import export_model  # noqa: E402
from poelm.model import GPT, GPTConfig, rmsnorm, softcap  # noqa: E402
from poelm.tokenizer import Tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over lazy dog and cat sat on mat with hat in sun while birds sing songs "
         "of joy café naïve Über 東京 ✓ 12 345 6789").split()


def synthetic_texts(n: int = 300, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(40)) + f". Line {i}!\n" for i in range(n)]


def make_model(vocab_size: int, seed: int = 0, **overrides) -> GPT:
    """A tiny random model with noise on every tensor (the zero-init projections would make blocks identities)."""
    cfg = dict(n_layer=4, n_embd=64, n_head=4, n_kv_head=2, vocab_size=vocab_size, sequence_len=64, short_window=8,
               poe_every=1, poe_mode="flat")
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; with two on a busy 2-core machine every op waits
    for the other thread (seconds instead of milliseconds per generate call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(synthetic_texts(), vocab_size=320)


@pytest.fixture(scope="module")
def native(tok) -> GPT:
    return make_model(tok.vocab_size)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, native, tok) -> Path:
    return export_model(native, tok, tmp_path_factory.mktemp("hf") / "poe", dtype=torch.float32)


@pytest.fixture(scope="module")
def hf(export_dir):
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    return model.eval(), tokenizer


def stop_ids(tok: Tokenizer) -> set[int]:
    return {tok.bos_token_id, tok.special_tokens["<|assistant_end|>"]}


@torch.no_grad()
def reference_greedy(model: GPT, ids: list[int], n: int, stops: set[int], penalty: float = 1.0) -> list[int]:
    """Greedy decoding with the full forward every step and transformers' repetition-penalty rule."""
    ids = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].float()
        if penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            s = logits[seen]
            logits[seen] = torch.where(s < 0, s * penalty, s / penalty)
        nxt = int(logits.argmax())
        ids.append(nxt)
        if nxt in stops:
            break
    return ids


# -----------------------------------------------------------------------------
# Export layout


def test_client_export_layout(export_dir):
    names = {p.name for p in export_dir.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "configuration_cognica_poe.py",
                     "modeling_cognica_poe.py", "tokenization_cognica_poe.py", "poe_model.py", "poe_tokenizer.py",
                     "tokenizer.pkl", "tokenizer_config.json", "special_tokens_map.json", "token_bytes.pt"):
        assert required in names, required
    assert "tokenizer.json" not in names  # transformers would take it for a fast-tokenizer file
    cfg = json.loads((export_dir / "config.json").read_text())
    assert cfg["model_type"] == "cognica_poe"
    assert all(isinstance(v, str) for v in cfg["auto_map"].values())  # no list in config.json's auto_map
    assert "AutoTokenizer" not in cfg["auto_map"]
    for name, value in (("num_hidden_layers", 4), ("hidden_size", 64), ("num_attention_heads", 4),
                        ("num_key_value_heads", 2), ("vocab_size", 320), ("max_position_embeddings", 64)):
        assert cfg[name] == value, name
    tcfg = json.loads((export_dir / "tokenizer_config.json").read_text())
    slow, fast = tcfg["auto_map"]["AutoTokenizer"]
    assert fast is None and "Tokenizer" in slow.split(".")[-1]
    gen = json.loads((export_dir / "generation_config.json").read_text())
    assert gen["bos_token_id"] in gen["eos_token_id"]


def test_client_exported_modules_import_only_stdlib_torch_tiktoken(export_dir):
    """transformers copies relative imports into its module cache and checks every import is
    installed: the shipped model/tokenizer modules must need nothing beyond torch and tiktoken."""
    allowed = set(sys.stdlib_module_names) | {"torch", "tiktoken", "__future__"}
    for name in ("poe_model.py", "poe_tokenizer.py"):
        tree = ast.parse((export_dir / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Try):  # transformers skips imports inside try blocks
                for inner in ast.walk(node):
                    setattr(inner, "_in_try", True)
        for node in ast.walk(tree):
            if getattr(node, "_in_try", False):
                continue
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module.split(".")[0]]
            else:
                continue
            assert set(mods) <= allowed, f"{name} imports {mods}"
    assert (export_dir / "poe_model.py").read_bytes() == (ROOT / "poelm" / "model.py").read_bytes()


# -----------------------------------------------------------------------------
# Config and model


def test_client_autoconfig(export_dir, native):
    cfg = AutoConfig.from_pretrained(export_dir, trust_remote_code=True)
    assert type(cfg).__name__ == "CognicaPoEConfig"
    assert cfg.num_hidden_layers == 4 and cfg.hidden_size == 64 and not cfg.tie_word_embeddings
    assert cfg.to_gpt_config().to_dict() == native.config.to_dict()


def test_client_config_from_standard_names_only(export_dir):
    cls = type(AutoConfig.from_pretrained(export_dir, trust_remote_code=True))
    cfg = cls(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
              max_position_embeddings=64, poe_every=2)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.sequence_len) == (4, 64, 4, 2, 64)
    assert cfg.to_gpt_config().stage_ends == [1, 3]


@torch.no_grad()
def test_client_logits_equal_native(hf, native, tok):
    model, _ = hf
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("the quick brown fox jumps over the lazy dog and cat")])
    want = native(ids)
    got = model(ids).logits
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got_mask = model(ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got_mask, want, atol=1e-5, rtol=0)
    # cached: prefill then one token at a time, the cache lives across calls
    out = model(ids[:, :5], use_cache=True)
    pieces, past = [out.logits], out.past_key_values
    for t in range(5, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        pieces.append(out.logits)
        past = out.past_key_values
    assert past.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.cat(pieces, 1), want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_client_cache_grows_and_crops(hf, native):
    """The cache starts at 64 slots and doubles; crop(-n) / crop(n) roll it back like transformers does."""
    model, _ = hf
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 100), generator=g)
    want = native(ids)
    out = model(ids[:, :10], use_cache=True)
    past, pieces = out.past_key_values, [out.logits]
    for t in range(10, 100, 7):  # chunks of 7: multi-token steps across the growth points
        out = model(ids[:, t:t + 7], past_key_values=past, use_cache=True)
        pieces.append(out.logits)
    assert past.kv.max_len >= 100 and past.get_seq_length() == 100
    torch.testing.assert_close(torch.cat(pieces, 1), want, atol=1e-5, rtol=0)
    past.crop(-30)  # drop the last 30 positions, then redo them
    assert past.get_seq_length() == 70
    again = model(ids[:, 70:], past_key_values=past, use_cache=True).logits
    torch.testing.assert_close(again, want[:, 70:], atol=1e-5, rtol=0)
    past.crop(50)  # absolute (the transformers 4 convention)
    assert past.get_seq_length() == 50
    torch.testing.assert_close(model(ids[:, 50:60], past_key_values=past).logits, want[:, 50:60], atol=1e-5, rtol=0)


def test_client_to_device_and_dtype(export_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32)
    assert not any(b.is_meta for b in model.buffers())  # transformers 4 left the rotary tables on meta
    model = model.to("cpu").to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    out = model.generate(**tokenizer("the cat", return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert out.shape[1] > 3 and model.dtype == torch.bfloat16


@torch.no_grad()
def test_client_labels_loss(hf, native, tok):
    model, _ = hf
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("birds sing songs of joy")])
    loss = model(ids, labels=ids).loss
    nats = native.token_nats(ids[:, :-1], ids[:, 1:])["final"]
    assert abs(loss.item() - nats.mean().item()) < 1e-5


def test_client_generate_greedy_cache_on_off(hf, native, tok):
    model, tokenizer = hf
    for prompt in ("the quick brown", "birds sing", "12 345"):
        enc = tokenizer(prompt, return_tensors="pt")
        on = model.generate(**enc, max_new_tokens=24, do_sample=False)
        off = model.generate(**enc, max_new_tokens=24, do_sample=False, use_cache=False)
        assert on.tolist() == off.tolist()
        ref = reference_greedy(native, enc["input_ids"][0].tolist(), 24, stop_ids(tok))
        assert on[0].tolist() == ref


def test_client_generate_repetition_penalty(hf, native, tok):
    model, tokenizer = hf
    enc = tokenizer("sing songs of joy", return_tensors="pt")
    on = model.generate(**enc, max_new_tokens=24, do_sample=False, repetition_penalty=1.15)
    off = model.generate(**enc, max_new_tokens=24, do_sample=False, repetition_penalty=1.15, use_cache=False)
    assert on.tolist() == off.tolist()
    ref = reference_greedy(native, enc["input_ids"][0].tolist(), 24, stop_ids(tok), penalty=1.15)
    assert on[0].tolist() == ref
    plain = model.generate(**enc, max_new_tokens=24, do_sample=False)
    assert plain.tolist() != on.tolist()  # the penalty changes this row's choices


def test_client_generate_sampled_cache_on_off(hf):
    model, tokenizer = hf
    enc = tokenizer("while birds sing", return_tensors="pt")
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(model.generate(**enc, max_new_tokens=20, do_sample=True, temperature=0.9, top_k=50, top_p=0.95,
                                   repetition_penalty=1.15, use_cache=use_cache).tolist())
    assert runs[0] == runs[1]
    torch.manual_seed(124)
    other = model.generate(**enc, max_new_tokens=20, do_sample=True, temperature=0.9).tolist()
    assert len(other[0]) > enc["input_ids"].shape[1]


def test_client_batched_left_padding(hf):
    model, tokenizer = hf
    prompts = ["the quick brown fox jumps over", "cat", "songs of joy and"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and bool((batch["attention_mask"] == 0).any())
    for use_cache in (True, False):
        out = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=use_cache)
        width = batch["input_ids"].shape[1]
        for row, prompt in enumerate(prompts):
            enc = tokenizer(prompt, return_tensors="pt")
            single = model.generate(**enc, max_new_tokens=12, do_sample=False)
            new_single = single[0, enc["input_ids"].shape[1]:].tolist()
            new_batch = out[row, width:width + len(new_single)].tolist()
            assert new_batch == new_single, (prompt, use_cache)


def test_client_beam_search_and_return_sequences(hf):
    model, tokenizer = hf
    batch = tokenizer(["the quick brown", "cat"], return_tensors="pt", padding=True)
    beams = [model.generate(**batch, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=use_cache)
             for use_cache in (True, False)]
    assert torch.equal(beams[0], beams[1])
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(model.generate(**batch, max_new_tokens=8, do_sample=True, num_return_sequences=2,
                                   use_cache=use_cache))
    assert runs[0].shape[0] == 4 and torch.equal(runs[0], runs[1])


def test_client_pipeline(hf):
    model, tokenizer = hf
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "the quick brown fox"
    text = generator(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    ids = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=10, do_sample=False)
    assert text.startswith(prompt)
    assert text == tokenizer.decode(ids[0], skip_special_tokens=True)


# -----------------------------------------------------------------------------
# Depth at call time: early exit


def _spy_depths(model):
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(model.config.num_hidden_layers)
        return forward(*args, **kwargs)

    model.forward = spy
    return seen, lambda: delattr(model, "forward")


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_client_assistant_early_exit_matches_greedy(hf, exit_layer):
    model, tokenizer = hf
    enc = tokenizer("the quick brown fox jumps", return_tensors="pt")
    plain = model.generate(**enc, max_new_tokens=20, do_sample=False)
    seen, restore = _spy_depths(model)
    try:
        early = model.generate(**enc, max_new_tokens=20, do_sample=False, assistant_early_exit=exit_layer)
    finally:
        restore()
    assert early.tolist() == plain.tolist()
    assert exit_layer in seen and 4 in seen  # drafts at the exit layer, verification at full depth
    assert model.config.num_hidden_layers == 4


def test_client_early_exit_non_boundary_and_stage_heads(tmp_path, tok):
    """Stages of 2 layers with per-stage heads: exit at 1 (inside a stage: shared head) and 2
    (a boundary: the stage readout) both keep greedy output; the logits follow the documented readout."""
    native = make_model(tok.vocab_size, seed=3, poe_every=2, per_stage_head=True)
    with torch.no_grad():
        for head in native.lm_head_stages:
            head.weight.add_(torch.randn_like(head.weight) * 0.5)
    d = export_model(native, tok, tmp_path / "psh", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    ids = tokenizer("the cat sat on", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        final, stage_logits = native(ids, return_stage_logits=True)
        x = x0 = native.embed(ids)
        x1, _ = native.run_layers(x, x0, ids, 0, 1)
        shared_1 = softcap((rmsnorm(x1) @ native.lm_head.weight.t())[..., : native.config.vocab_size].float())
        want = {1: shared_1, 2: stage_logits[0], 3: None, 4: final}
        for depth, expected in want.items():
            model.config.num_hidden_layers = depth
            try:
                got = model(ids).logits
            finally:
                model.config.num_hidden_layers = 4
            if expected is not None:
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    enc = tokenizer("the cat sat on", return_tensors="pt")
    plain = model.generate(**enc, max_new_tokens=16, do_sample=False)
    for k in (1, 2, 3):
        early = model.generate(**enc, max_new_tokens=16, do_sample=False, assistant_early_exit=k)
        assert early.tolist() == plain.tolist()


def test_client_bp_model_backout_readout(tmp_path, tok):
    native = make_model(tok.vocab_size, seed=5, poe_every=2, poe_mode="none")
    assert native.config.backout
    d = export_model(native, tok, tmp_path / "bp", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("over lazy dog")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, native(ids), atol=1e-5, rtol=0)


def test_client_logop_final_readout(tmp_path, tok):
    """An imported fork per-stage-head model reads out the Log-OP of all stages; so does its export."""
    native = make_model(tok.vocab_size, seed=6, poe_every=2, per_stage_head=True, final_readout="logop",
                        final_logop_alpha=0.0)
    d = export_model(native, tok, tmp_path / "logop", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    assert model.config.final_readout == "logop"
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("over lazy dog and cat")])
    with torch.no_grad():
        want = native(ids)
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)
        out = model(ids[:, :-2], use_cache=True)  # cached continuation reads out the same way
        step = model(ids[:, -2:], past_key_values=out.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step, want[:, -2:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_mode", ["dual", "base", "spec"])
def test_client_specialist_head_modes(tmp_path_factory, tok, head_mode):
    """An exported specialist reads out lm_head + lm_head_stage as poelm does, in every head_mode
    (recorded in config.json, or chosen at load time); cached continuation too."""
    from poelm.specialist import attach, trainable_parameters, with_head_mode

    base = make_model(tok.vocab_size, seed=7)
    spec = attach(base, 2)
    torch.manual_seed(8)
    with torch.no_grad():
        for p in trainable_parameters(spec).values():
            p.add_(torch.randn_like(p) * 0.05)
    root = tmp_path_factory.mktemp("spec")
    dual = export_model(spec.eval(), tok, root / "dual", dtype=torch.float32)
    recorded = export_model(with_head_mode(spec, head_mode), tok, root / "recorded", dtype=torch.float32)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("over lazy dog and cat")])
    with torch.no_grad():
        want = spec(ids)
        for d, kwargs in ((recorded, {}), (dual, {"head_mode": head_mode})):
            model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32, **kwargs).eval()
            assert model.config.head_mode == head_mode and model.config.frozen_layers == 4
            torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)
        out = model(ids[:, :-2], use_cache=True)
        step = model(ids[:, -2:], past_key_values=out.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step, want[:, -2:], atol=1e-5, rtol=0)


def test_client_bad_depth(hf):
    model, _ = hf
    model.config.num_hidden_layers = 9
    try:
        with pytest.raises(ValueError, match="num_hidden_layers=9"):
            model(torch.tensor([[1, 2, 3]]))
    finally:
        model.config.num_hidden_layers = 4


# -----------------------------------------------------------------------------
# Tokenizer


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_client_tokenizer_parity(hf, tok, text):
    _, tokenizer = hf
    ids = tok.encode(text)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer.encode(text) == [tok.bos_token_id] + ids
    assert tokenizer.decode(ids) == tok.decode(ids)
    assert tokenizer.decode([tok.bos_token_id] + ids, skip_special_tokens=True) == tok.decode(ids)
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)) == tok.decode(ids)


def test_client_tokenizer_bos_protocol(export_dir, hf, tok):
    _, tokenizer = hf
    bos = tok.bos_token_id
    assert tokenizer.bos_token_id == bos and tokenizer.eos_token_id == bos and tokenizer.pad_token_id == bos
    assert tokenizer.add_bos_token is True
    assert tokenizer("hello")["input_ids"][0] == bos  # base models expect <|bos|> first
    assert tokenizer("hello", add_special_tokens=False)["input_ids"] == tok.encode("hello")
    assert tokenizer("")["input_ids"] == [bos]
    assert tokenizer.encode([bos, 5, 6]) == [bos, 5, 6]  # already there: not doubled
    assert tokenizer.encode([5, 6]) == [bos, 5, 6]
    assert tokenizer("x", return_special_tokens_mask=True)["special_tokens_mask"][0] == 1
    # "<|bos|>" typed in text is ordinary bytes, as in poelm
    assert tokenizer("<|bos|>", add_special_tokens=False)["input_ids"] == tok.encode("<|bos|>")
    assert bos not in tokenizer("<|bos|>", add_special_tokens=False)["input_ids"]
    off = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True, add_bos_token=False)
    assert off("hello")["input_ids"] == tok.encode("hello")
    assert tokenizer.convert_tokens_to_ids("<|assistant_end|>") == tok.special_tokens["<|assistant_end|>"]
    assert len(tokenizer) == tok.vocab_size == tokenizer.vocab_size


def test_client_loading_warns_nothing_about_auto_map(export_dir):
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
            AutoConfig.from_pretrained(export_dir, trust_remote_code=True)
            AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    finally:
        logger.removeHandler(handler)
    messages = records + [str(w.message) for w in caught]
    assert not [m for m in messages if "auto_map" in m or "must be a string" in m], messages
    assert not [m for m in records if "token" in m.lower()], records  # nothing from the tokenizer at all


def test_client_token_bytes(tmp_path, export_dir, tok):
    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    assert torch.equal(tokenizer.token_bytes, tok.token_bytes())
    d = tmp_path / "no_tb"
    shutil.copytree(export_dir, d)
    (d / "token_bytes.pt").unlink()
    tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    assert tokenizer("the cat")["input_ids"][1:] == tok.encode("the cat")  # the rest still works
    with pytest.warns(UserWarning, match="token_bytes.pt"):
        tb = tokenizer.token_bytes
    assert torch.equal(tb, tok.token_bytes())


def test_client_save_pretrained_roundtrip(tmp_path, hf, native, tok):
    model, tokenizer = hf
    out = tmp_path / "resaved"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tok2 = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("songs of joy")])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, native(ids), atol=1e-5, rtol=0)
    assert tok2("songs of joy")["input_ids"] == ids[0].tolist()
    # poelm reads what transformers wrote (extra config keys, `model.`-prefixed tensor names)
    loaded, loaded_tok = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), native(ids), atol=1e-6, rtol=0)
    assert loaded_tok.encode("songs of joy") == tok.encode("songs of joy")


@pytest.mark.parametrize("prefix", ["", "model.", "_orig_mod.", "module."])
def test_client_weight_name_prefixes(tmp_path, export_dir, native, tok, prefix):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "pfx"
    shutil.copytree(export_dir, d)
    state = load_file(str(d / "model.safetensors"))
    save_file({prefix + k: v for k, v in state.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32)
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, native(ids), atol=1e-5, rtol=0)


def test_client_mismatched_weights_name_keys(tmp_path, export_dir):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bad"
    shutil.copytree(export_dir, d)
    state = load_file(str(d / "model.safetensors"))
    state.pop("lm_head.weight")
    state["foo.bar"] = torch.zeros(3)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys: model\.lm_head\.weight; unexpected keys: foo\.bar"):
        AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)


# -----------------------------------------------------------------------------
# poelm's side of the layout: export command, loading exports, bad input


def _cli(*argv: str) -> tuple[int, str, str]:
    """Run `poelm` in a subprocess (offline, so a hub id fails fast)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "poelm", *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_export_command_bf16_and_poelm_loads_it(tmp_path, native, tok):
    from poelm.checkpoint import save_model
    from poelm.cli import main

    src = save_model(native, tmp_path / "src", tok)
    (src / "generation_config.json").write_text(json.dumps({"wand_bounds": [1.0, 2.0, 3.0, 4.0]}))
    out = tmp_path / "hf"
    assert main(["export", str(src), "--out", str(out), "--json"]) == 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert set(f.keys()) == set(native.state_dict())
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["wand_bounds"] == [1.0, 2.0, 3.0, 4.0]  # calibration travels with the model
    assert oct((out / "config.json").stat().st_mode & 0o777) != oct(0o600)
    model, loaded_tok = load_model(out)  # every poelm command accepts the export
    assert loaded_tok is not None and loaded_tok.encode("the cat") == tok.encode("the cat")
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("the cat sat")])
    rounded = make_model(tok.vocab_size)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        torch.testing.assert_close(model(ids), rounded(ids), atol=1e-5, rtol=0)
    rc, stdout, _ = _cli("inspect", str(out), "--json")
    assert rc == 0 and json.loads(stdout)["n_layer"] == 4
    hf_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # dtype from the config
    assert hf_model.dtype == torch.bfloat16 or transformers.__version__.startswith("4.")
    hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    gen_ids = hf_model.generate(**hf_tok("the cat", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert gen_ids.shape[1] > 3


def test_export_fp32_cli_json(tmp_path, native, tok):
    from poelm.checkpoint import save_model

    src = save_model(native, tmp_path / "src", tok)
    rc, stdout, stderr = _cli("export", str(src), "--out", str(tmp_path / "hf32"), "--dtype", "fp32", "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert result["dtype"] == "float32" and "modeling_cognica_poe.py" in result["files"]
    model, _ = load_model(tmp_path / "hf32")
    ids = torch.tensor([[tok.bos_token_id, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids), native(ids))


def test_export_without_tokenizer_warns(tmp_path):
    rc, stdout, stderr = _cli("export", "tiny", "--out", str(tmp_path / "t"), "--dtype", "fp32")
    assert rc == 0
    assert "no tokenizer" in stderr and not (tmp_path / "t" / "tokenizer.pkl").exists()
    rc, _, stderr = _cli("export", "tiny", "--out", str(tmp_path / "t"), "--dtype", "int3")
    assert rc == 2 and stderr.count("\n") == 1 and "dtype" in stderr


def test_bad_input_one_line_errors(tmp_path, export_dir, tok):
    # a config but no weights
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(export_dir / "config.json", d / "config.json")
    rc, _, stderr = _cli("inspect", str(d))  # inspect reads only the config: fine
    assert rc == 0
    rc, _, stderr = _cli("export", str(d), "--out", str(tmp_path / "x"))
    assert rc == 2 and stderr.count("\n") == 1 and "model.safetensors" in stderr
    # weights of another shape
    other = export_model(make_model(tok.vocab_size, n_embd=32, n_head=2, n_kv_head=2), tok, tmp_path / "other",
                         dtype=torch.float32)
    shutil.copy(other / "model.safetensors", d / "model.safetensors")
    rc, _, stderr = _cli("export", str(d), "--out", str(tmp_path / "x"))
    assert rc == 2 and stderr.count("\n") == 1
    assert "model.safetensors" in stderr and "transformer.wte.weight (320, 32) != (320, 64)" in stderr
    # a hub id while offline: says how to get the files
    rc, _, stderr = _cli("inspect", "cognica/Cognica-PoE-v1.0-1.3B-base")
    assert rc == 2 and stderr.count("\n") == 1
    assert "cognica/Cognica-PoE-v1.0-1.3B-base" in stderr and "--local-dir" in stderr
    with pytest.raises(ValueError, match="download"):
        load_model("cognica/Cognica-BP-v1.0-1.3B-base")
    assert not list(tmp_path.glob("x*"))  # nothing half-written


def test_missing_token_bytes_warns_and_still_works(tmp_path, export_dir, tok):
    d = tmp_path / "no_tb"
    shutil.copytree(export_dir, d)
    (d / "token_bytes.pt").unlink()
    with pytest.warns(UserWarning, match=r"token_bytes\.pt is missing"):
        model, loaded_tok = load_model(d)
    assert loaded_tok.encode("the cat") == tok.encode("the cat")
    assert torch.equal(loaded_tok.token_bytes(), tok.token_bytes())


def test_config_json_standard_names(tmp_path, export_dir, native):
    from poelm.codec import from_config_json

    cfg = json.loads((export_dir / "config.json").read_text())
    poelm_names = ("n_layer", "n_embd", "n_head", "n_kv_head", "sequence_len")
    only_standard = {k: v for k, v in cfg.items() if k not in poelm_names}
    assert from_config_json(only_standard).to_dict() == native.config.to_dict()
    with pytest.raises(ValueError, match="hidden_size=65 disagrees with n_embd=64"):
        from_config_json({**cfg, "hidden_size": 65})
    with pytest.raises(ValueError, match="unknown config field"):
        from_config_json({**cfg, "n_layers": 4})


def test_native_registration(export_dir, native):
    """poelm's own copy of the classes serves the export without trust_remote_code."""
    import poelm.hf
    from poelm.hf.modeling_cognica_poe import CognicaPoEForCausalLM

    poelm.hf.register()
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    assert type(model) is CognicaPoEForCausalLM and isinstance(model.gpt, GPT)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, native(ids), atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# The released checkpoints' inventory (docs/model.md)


def released_inventory(L: int, d: int, V: int, n_head: int, n_kv_head: int, hd: int, inner: int) -> dict[str, tuple]:
    """Tensor name -> shape, written out from docs/model.md's table (independently of poelm.model)."""
    kv = n_kv_head * hd
    inv = {"resid_lambdas": (L,), "x0_lambdas": (L,), "smear_lambda": (1,), "backout_lambda": (1,),
           "transformer.wte.weight": (V, d), "lm_head.weight": (V, d), "smear_gate.weight": (1, 24)}
    for i in range(L):
        p = f"transformer.h.{i}."
        inv.update({p + "attn.c_q.weight": (n_head * hd, d), p + "attn.c_k.weight": (kv, d),
                    p + "attn.c_v.weight": (kv, d), p + "attn.c_proj.weight": (d, n_head * hd),
                    p + "mlp.c_fc.weight": (inner, d), p + "mlp.c_proj.weight": (d, inner)})
        if i % 2 == (L - 1) % 2:
            inv[p + "attn.ve_gate.weight"] = (n_kv_head, 12)
            inv[f"value_embeds.{i}.weight"] = (V, kv)
    return inv


def test_d24_inventory_matches_model_md_on_meta():
    from poelm.presets import get_preset

    want = released_inventory(24, 1536, 32768, 12, 12, 128, 4 * 1536)
    assert len(want) == 175 and sum(math.prod(s) for s in want.values()) == 1_384_122_122
    for name in ("bp-1.3b", "poe-1.3b"):
        with torch.device("meta"):
            model = GPT(get_preset(name))
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == want


def released_like_state(tok_vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small-depth state dict named and typed like the released 1.3B: bf16 wte and value
    embeddings, fp32 everything else."""
    g = torch.Generator().manual_seed(seed)
    V = math.ceil(tok_vocab / 64) * 64
    state = {}
    for name, shape in released_inventory(4, 64, V, 4, 4, 16, 256).items():
        t = torch.randn(shape, generator=g) * 0.1
        bf16 = name == "transformer.wte.weight" or name.startswith("value_embeds.")
        state[name] = t.to(torch.bfloat16) if bf16 else t
    state["resid_lambdas"] = torch.ones(4)
    return state


def write_released_like(directory: Path, state: dict, tok: Tokenizer, prefix: str = "") -> Path:
    from safetensors.torch import save_file

    from poelm.hf import REMOTE_CODE_FILES

    directory.mkdir(parents=True)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    config = {  # the release layout: architecture fields, stage layout, standard names, auto_map
        "model_type": "cognica_poe", "architectures": ["CognicaPoEForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_cognica_poe.CognicaPoEConfig",
                     "AutoModelForCausalLM": "modeling_cognica_poe.CognicaPoEForCausalLM"},
        "vocab_size": tok.vocab_size, "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 64, "intermediate_size": 256,
        "window_pattern": "SSSL", "short_window": 16, "poe_mode": "flat", "poe_alpha": 0.0, "poe_every": 1,
        "per_stage_head": False, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(directory)
    (directory / "tokenizer.json").unlink()
    for name, source in REMOTE_CODE_FILES.items():
        shutil.copyfile(source, directory / name)
    return directory


@pytest.mark.parametrize("prefix", ["", "model.", "_orig_mod."])
def test_released_like_checkpoint_loads(tmp_path, tok, prefix):
    state = released_like_state(tok.vocab_size)
    d = write_released_like(tmp_path / "rel", state, tok, prefix)
    model, loaded_tok = load_model(d)
    assert len(model.state_dict()) == len(state) == 7 * 4 + 7
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k].float()), k
    assert loaded_tok is not None
    hf_model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32)
    ids = torch.tensor([[tok.bos_token_id, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-5, rtol=0)


def test_released_like_mismatch_names_keys(tmp_path, tok):
    state = released_like_state(tok.vocab_size)
    state.pop("value_embeds.3.weight")
    state["lm_head_stages.0.weight"] = torch.zeros(1)
    d = write_released_like(tmp_path / "rel", state, tok, "model.")
    with pytest.raises(ValueError) as err:
        load_model(d)
    msg = str(err.value)
    assert "missing keys: value_embeds.3.weight" in msg and "unexpected keys: lm_head_stages.0.weight" in msg
    assert "model.safetensors" in msg


@pytest.mark.parametrize("overrides", [dict(), dict(per_stage_head=True, backout=True, window_pattern="SL")],
                         ids=["plain", "heads-backout"])
def test_export_stages_is_a_standalone_prefix(tmp_path, capsys, overrides):
    """`poelm export --stages K`: only the first K stages' tensors, loadable by poelm and transformers,
    logits == stage K-1's readout of the full model (windows and value embeddings of the source kept)."""
    from poelm.cli import main as cli_main
    from poelm.checkpoint import save_model
    from safetensors import safe_open

    torch.manual_seed(0)
    # 6 layers in stages 1+2+3: the cut after 1 or 3 layers ends on a short-window layer and on a parity
    # where a model that deep would put its value embeddings elsewhere
    full = GPT(GPTConfig(n_layer=6, n_embd=64, n_head=2, vocab_size=300, sequence_len=64, short_window=8,
                         poe_stage_layers=(1, 2, 3), **overrides))
    full.init_weights()
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(full.eval(), tmp_path / "full", None, dtype=torch.float32)
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        _, stage_logits = full(idx, return_stage_logits=True)
    for K, n_layer in ((1, 1), (2, 3)):
        out = tmp_path / f"s{K}"
        assert cli_main(["export", str(tmp_path / "full"), "--out", str(out), "--stages", str(K), "--dtype", "fp32"]) == 0
        with safe_open(out / "model.safetensors", "pt") as f:
            names = set(f.keys())
        assert not any(n.startswith(f"transformer.h.{n_layer}.") for n in names)
        assert {n.split(".")[2] for n in names if n.startswith("transformer.h.")} == {str(i) for i in range(n_layer)}
        small, _ = load_model(out)
        assert small.config.n_layer == n_layer and small.config.n_stages == K
        assert small.windows == full.windows[:n_layer]
        with torch.no_grad():
            got = small(idx)
            hf_logits = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)(idx).logits
        assert (got - stage_logits[K - 1]).abs().max().item() <= 1e-5
        assert (hf_logits[..., :300] - stage_logits[K - 1]).abs().max().item() <= 1e-5
    assert cli_main(["export", str(tmp_path / "full"), "--out", str(tmp_path / "s3"), "--stages", "3"]) == 2
    assert "keep 1..2 of them" in capsys.readouterr().err
