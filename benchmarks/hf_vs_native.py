"""Greedy decoding speed: poelm's engine against transformers' `generate` on the same exported model.

    .venv/bin/python benchmarks/hf_vs_native.py                          # random-init "tiny" preset, CPU
    .venv/bin/python benchmarks/hf_vs_native.py --model small --new-tokens 128 --json
    .venv/bin/python benchmarks/hf_vs_native.py --model runs/tiny --device cuda --dtype bf16

MODEL (any poelm MODEL; default the "tiny" preset with random weights plus a little noise:
plain decoding speed does not depend on the weights, self-speculative speed does, so measure
`--native-mode speculative` on a trained model) is exported to a temporary Hugging Face
directory, then loaded twice from it: by poelm (`load_model`) and by transformers
(`AutoModelForCausalLM`, `trust_remote_code=True`). Both decode the same prompts (random token
ids, `--prompts` of them, one at a time) greedily for exactly `--new-tokens` tokens with the KV
cache: poelm through `Engine.generate` (or a `forward_cached` loop when the engine is
unavailable), transformers through `generate` with `min_new_tokens = max_new_tokens` (no early
stop). The two token streams are checked to be identical. Each side runs one warm-up pass, then
`--repeats` timed passes, interleaved; the median repeat is reported. Both sides run the same
forward code (the remote code wraps poelm's model), so the ratio measures the decode loop
around it: transformers' generate against poelm's engine. The last line is the ratio:

    poelm/transformers tokens_per_s: X.XX
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poelm.checkpoint import load_model  # noqa: E402
from poelm.export import export_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="poelm MODEL (preset, directory, run); default: tiny preset")
    p.add_argument("--prompts", type=int, default=4, help="number of prompts (decoded one after another)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--native-mode", default="final", choices=["final", "speculative"],
                   help="engine mode: final (plain greedy, default) or speculative (self-speculative greedy, "
                        "token-identical to plain greedy)")
    p.add_argument("--draft-stage", type=int, default=0, help="speculative: the drafting stage")
    p.add_argument("--gamma", type=int, default=4, help="speculative: drafted tokens per verify pass")
    p.add_argument("--json", action="store_true", help="print one JSON object before the ratio line")
    return p.parse_args(argv)


def make_prompts(vocab: int, specials: set[int], n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    choices = [i for i in range(vocab) if i not in specials]
    return [[rng.choice(choices) for _ in range(length)] for _ in range(n)]


class NativeDecoder:
    """poelm's engine when its API is there, else a plain forward_cached greedy loop."""

    def __init__(self, model, device, options: dict):
        self.model, self.device, self.options = model, device, options
        try:
            from poelm.engine import Engine

            self.engine = Engine(model, None)
            self.kind = f"poelm.engine.Engine, mode {options.get('mode', 'final')}"
        except Exception:  # the engine is optional here
            if options.get("mode", "final") != "final":
                raise
            self.engine = None
            self.kind = "GPT.forward_cached loop"

    @torch.no_grad()
    def __call__(self, prompt: list[int], n: int) -> list[int]:
        if self.engine is not None:
            out = self.engine.generate(prompt, max_new_tokens=n, stop_token_ids=[], add_bos=False, **self.options)
            return list(out.tokens)
        cache = self.model.new_cache(1, len(prompt) + n)
        logits = self.model.forward_cached(torch.tensor([prompt], device=self.device), cache)
        tokens = []
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            if len(tokens) == n:
                break
            logits = self.model.forward_cached(nxt, cache)
        return tokens


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    device = torch.device(args.device)
    source, tokenizer = load_model(args.model, seed=args.seed)
    from poelm.presets import PRESETS

    if args.model in PRESETS and not Path(args.model).exists():
        # nanochat's init zeroes every output projection (each block starts as an identity, every
        # stage reads out the same logits); a little noise makes the random model a fair stand-in
        torch.manual_seed(args.seed)
        with torch.no_grad():
            for p in source.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory(prefix="poelm-hf-bench-") as tmp:
        export_dir = export_model(source, tokenizer, Path(tmp) / "model", dtype=dtype)
        native, _ = load_model(export_dir, device=device, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=dtype).to(device).eval()
    cfg = native.config
    specials = set(tokenizer.special_tokens.values()) if tokenizer is not None else set()
    total = args.prompt_tokens + args.new_tokens
    if total > cfg.sequence_len:
        raise SystemExit(f"--prompt-tokens + --new-tokens = {total} exceeds the model's context {cfg.sequence_len}")
    prompts = make_prompts(cfg.vocab_size, specials, args.prompts, args.prompt_tokens, args.seed)
    options = {"mode": args.native_mode}
    if args.native_mode == "speculative":
        options.update(draft_stage=args.draft_stage, gamma=args.gamma, force=True)
    decode_native = NativeDecoder(native, device, options)

    @torch.no_grad()
    def decode_hf(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt], device=device)
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()

    def run(decode) -> tuple[float, list[list[int]]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = [decode(p, args.new_tokens) for p in prompts]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, outs

    _, native_tokens = run(decode_native)  # warm-up passes, also the parity check
    _, hf_tokens = run(decode_hf)
    same = native_tokens == hf_tokens
    times = {"poelm": [], "transformers": []}
    for _ in range(args.repeats):
        times["poelm"].append(run(decode_native)[0])
        times["transformers"].append(run(decode_hf)[0])
    n_tokens = args.prompts * args.new_tokens
    tps = {k: n_tokens / statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
        "params": native.num_params(), "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "transformers": transformers.__version__, "native": decode_native.kind,
        "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "identical_tokens": same,
        "poelm_tokens_per_s": tps["poelm"], "transformers_tokens_per_s": tps["transformers"],
        "ratio": tps["poelm"] / tps["transformers"],
    }
    print(f"model {args.model}: {cfg.n_layer} layers, width {cfg.n_embd}, {result['params']:,} params, "
          f"{args.dtype} on {device} ({result['threads']} threads), transformers {transformers.__version__}")
    print(f"{args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, greedy, "
          f"median of {args.repeats}")
    print(f"identical tokens: {same}")
    print(f"poelm ({decode_native.kind}) tokens_per_s: {tps['poelm']:.2f}")
    print(f"transformers generate tokens_per_s: {tps['transformers']:.2f}")
    if args.json:
        print(json.dumps(result))
    print(f"poelm/transformers tokens_per_s: {result['ratio']:.2f}")
    return result


if __name__ == "__main__":
    main()
