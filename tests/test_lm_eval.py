"""lm-evaluation-harness on an exported model, offline: its loglikelihoods equal poelm's own
scoring of the same continuations.

The task is shipped in tests/data/lm_eval/ (poe_tiny.yaml: `dataset_path: json` over
poe_tiny.jsonl, output_type loglikelihood) and runs with that directory as the working
directory, HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1:

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \
        --tasks poe_tiny --include_path tests/data/lm_eval --log_samples --output_path OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poelm.checkpoint import load_model
from poelm.export import export_model

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from test_hf import make_model, synthetic_texts  # noqa: E402  (tests/ is on sys.path, like conftest)

from poelm.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval"
TOLERANCE = 1e-4


def native_loglikelihood(model, tok: Tokenizer, context: str, continuation: str,
                         bos: bool = True) -> tuple[float, bool]:
    """poelm's score of `continuation` after `context`, tokenised the way lm-eval does for causal
    models: trailing spaces of the context move to the continuation, the continuation's tokens are
    those of the whole text after the context's (so merges across the boundary count as the
    whole text has them), <|bos|> first."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    prefix = [tok.bos_token_id] if bos else []
    whole = prefix + tok.encode(stripped + continuation)
    n_ctx = len(prefix + tok.encode(stripped))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids[:, :-1]).float().log_softmax(-1)[0]
    targets = ids[0, n_ctx:]
    picked = logp[n_ctx - 1:].gather(1, targets.unsqueeze(1)).squeeze(1)
    greedy = bool((logp[n_ctx - 1:].argmax(-1) == targets).all())
    return float(picked.sum()), greedy


def read_samples(out_dir: Path) -> list[dict]:
    files = sorted(out_dir.rglob("samples_poe_tiny_*.jsonl"))
    assert files, f"lm-eval wrote no samples under {out_dir}"
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def test_lm_eval_loglikelihoods_equal_poelm(tmp_path):
    tok = Tokenizer.train(synthetic_texts(), vocab_size=320)
    model = make_model(tok.vocab_size, seed=11, sequence_len=128, short_window=16)
    model_dir = export_model(model, tok, tmp_path / "model", dtype=torch.float32)
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={model_dir},trust_remote_code=True",
           "--tasks", "poe_tiny", "--include_path", str(TASK_DIR), "--output_path", str(out), "--log_samples",
           "--device", "cpu", "--batch_size", "4"]
    proc = subprocess.run(cmd, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    native, native_tok = load_model(model_dir)  # poelm reads the same directory
    docs = [json.loads(line) for line in (TASK_DIR / "poe_tiny.jsonl").read_text().splitlines() if line.strip()]
    samples = sorted(read_samples(out), key=lambda s: s["doc_id"])
    assert len(samples) == len(docs) >= 5
    worst, bos_effect = 0.0, 0.0
    for sample in samples:
        doc = docs[sample["doc_id"]]
        # lm-eval left-truncates to the model's context (max_position_embeddings): keep every example inside it
        assert len(native_tok.encode(doc["context"] + doc["continuation"])) + 1 <= native.config.sequence_len
        ll_text, greedy_text = sample["resps"][0][0]
        ll, greedy = native_loglikelihood(native, native_tok, doc["context"], doc["continuation"])
        worst = max(worst, abs(float(ll_text) - ll))
        assert abs(float(ll_text) - ll) < TOLERANCE, (doc, ll_text, ll)
        assert (greedy_text == "True") == greedy, doc
        no_bos, _ = native_loglikelihood(native, native_tok, doc["context"], doc["continuation"], bos=False)
        bos_effect = max(bos_effect, abs(no_bos - ll))
    assert bos_effect > 100 * TOLERANCE  # the agreement depends on lm-eval putting <|bos|> first
    print(f"lm-eval vs poelm: max |loglikelihood difference| = {worst:.2e} over {len(samples)} examples",
          file=sys.stderr)
