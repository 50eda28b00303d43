"""The one device check of the GPU paths: training throughput / MFU / memory, the projected
wall time of `poelm experiment paper-d24`, decode speed of every mode, agreement, and poelm
decode vs transformers `generate` on the same export. Ratios are printed last.

    .venv/bin/python benchmarks/gpu_check.py                 # one GPU: about 5-7 minutes
    .venv/bin/python benchmarks/gpu_check.py --cpu           # dry run at tiny size (seconds; the test runs it)
    .venv/bin/python benchmarks/gpu_check.py --json out.json --skip-small

What it measures (on one GPU: bf16 autocast, the training step torch.compile'd, the attention
backend `auto` = flash-attn when installed, else FlexAttention):
- train   tokens/s, MFU (model.flops_per_token / step time / the GPU's peak bf16 FLOPs) and peak
          memory of one optimizer step (MuonAdamW, as `poelm train` runs it) for the d24 shape and
          gpu-small, BP (poe_mode none) and PoE flat, on random tokens; median of the timed steps
          after the compile warm-up steps.
- projection  `poelm experiment paper-d24`: every arm's tokens (20 x params) / the measured tokens/s
          of its objective, on 1 GPU and on 4 (perfect data-parallel scaling assumed: a lower bound).
- decode  the d24 shape with random weights (speed only): plain (final readout), plain with the
          compiled static-shape step (CUDA graphs), stage 0, speculative (draft stage 0, gamma 4),
          WAND (bounds calibrated on random tokens); one prompt, greedy.
- agreement  a tiny model trained for a few seconds on a repeating text: compiled plain, speculative
          and every available attention backend give the plain eager tokens (fp32).
- hf      benchmarks/hf_vs_native.py on the d24 preset (poe-1.3b, random weights): poelm's engine vs
          transformers `generate` on the same export, token-identical greedy.

Running it on the GPU machine: torch 2.11, no network. Everything it imports is poelm, torch,
numpy, safetensors and (for the hf section, skipped when missing) transformers; the tokenizer
is not needed (random tokens). Carry any wheel the venv there lacks (e.g. rustbpe, which
poelm.tokenizer imports lazily, and transformers) in the working tree and pip install it
offline first (`pip install --no-index wheels/*.whl`). Only torch APIs present in 2.11 are
used (FlexAttention, torch.compile, torch._dynamo.mark_static_address,
torch.compiler.cudagraph_mark_step_begin).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poelm.engine import DecodeOptions, Engine, PlainDecoder, calibrate  # noqa: E402
from poelm.experiment.config import ARMS, EXPERIMENTS  # noqa: E402
from poelm.model import GPT, GPTConfig, resolve_attention_backend  # noqa: E402
from poelm.optim import build_optimizer  # noqa: E402
from poelm.schedule import apply_schedules  # noqa: E402
from poelm.train import peak_flops  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU at tiny size (fp32, no compile)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--skip-small", action="store_true", help="train only the d24 shape (saves ~1-2 minutes)")
    p.add_argument("--skip-hf", action="store_true", help="leave out poelm vs transformers generate")
    return p.parse_args(argv)


def shapes(cpu: bool) -> dict[str, tuple[GPTConfig, int]]:
    """name -> (model of the BP arm, rows per step): the experiments' shapes, or tiny ones for --cpu."""
    if cpu:
        tiny = GPTConfig(n_layer=4, n_embd=64, n_head=2, vocab_size=256, sequence_len=64, poe_every=1, poe_mode="none")
        return {"d24": (tiny, 2)}
    out = {}
    for name in ("paper-d24", "gpu-small"):
        e = EXPERIMENTS[name]
        out[name] = (GPTConfig(**e["model"], vocab_size=e["vocab_size"], poe_mode="none"), e["device_batch_size"])
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_row(name: str, config: GPTConfig, poe_mode: str, rows: int, device: torch.device, cpu: bool) -> dict:
    """One optimizer step as `poelm train` runs it, timed (median after the warm-up steps)."""
    import dataclasses

    config = dataclasses.replace(config, poe_mode=poe_mode, backout=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    optimizer = build_optimizer(model)
    step_fn = model if cpu else torch.compile(model)
    autocast = None if cpu else torch.bfloat16
    T = config.sequence_len
    x = torch.randint(0, config.vocab_size, (rows, T + 1), device=device)
    warmup, timed = (1, 2) if cpu else (2, 5)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + timed):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = step_fn(x[:, :-1], x[:, 1:])
        loss.backward()
        apply_schedules(optimizer, i, 100, warmup_steps=1)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    peak = peak_flops(device)
    flops = model.flops_per_token(T) * rows * T
    return {"shape": name, "arm": "bp" if poe_mode == "none" else "poe_flat", "params": model.num_params(),
            "tokens_per_step": rows * T, "step_s": dt, "tokens_per_s": rows * T / dt,
            "mfu": flops / dt / peak if peak else None, "loss": loss.item(),
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}


def projection(train: list[dict]) -> dict:
    """Wall time of `poelm experiment paper-d24` from the measured d24 rows (tokens = 20 x params per arm)."""
    rate = {r["arm"]: r for r in train if r["shape"] in ("paper-d24", "d24")}
    ratio = EXPERIMENTS["paper-d24"]["target_param_data_ratio"]
    seconds = 0.0
    for _, poe_mode, _ in ARMS:
        r = rate["bp" if poe_mode == "none" else "poe_flat"]
        seconds += ratio * r["params"] / r["tokens_per_s"]
    return {"arms": [a[0] for a in ARMS], "hours_1_gpu": seconds / 3600, "hours_4_gpus": seconds / 4 / 3600,
            "assumes": "perfect data-parallel scaling, no evaluation or checkpoint time"}


def random_decode_model(config: GPTConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # zero-init projections would make every layer an identity
            p.add_(0.02 * torch.randn_like(p))
    return model.to(dtype).eval()


def timed_tokens(fn, device: torch.device) -> tuple[list[int], float]:
    fn()  # warm-up (and compilation)
    sync(device)
    t0 = time.perf_counter()
    tokens = fn()
    sync(device)
    return tokens, len(tokens) / (time.perf_counter() - t0)


def plain_decoder_run(model: GPT, prompt: list[int], n: int, compile_mode: str | None, cpu: bool) -> list[int]:
    dec = PlainDecoder(model, DecodeOptions(max_new_tokens=n), len(prompt) + n)
    with torch.no_grad():
        handle = dec.add_rows([prompt])[0]
        if compile_mode is not None:
            dec.compile_step(backend="eager" if cpu else "inductor", mode=None if cpu else compile_mode)
        return [dec.step()[handle][0] for _ in range(n)]


def decode_section(config: GPTConfig, device: torch.device, cpu: bool) -> list[dict]:
    dtype = torch.float32 if cpu else torch.bfloat16
    model = random_decode_model(config, device, dtype)
    n_prompt, n_new = (16, 8) if cpu else (128, 128)
    prompt = torch.randint(0, config.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    batches = [torch.randint(0, config.vocab_size, (2, min(256, config.sequence_len)), device=device)]
    engine = Engine(model, calibration=calibrate(model, batches, force=True))
    modes = {"plain": {}, "stage0": dict(mode="stage", stage=0),
             "speculative": dict(mode="speculative", draft_stage=0, gamma=4, force=True), "wand": dict(mode="wand")}
    rows = []
    for name, opts in modes.items():
        run = lambda: engine.generate(prompt, max_new_tokens=n_new, stop_token_ids=[], **opts).tokens  # noqa: E731
        _, tps = timed_tokens(run, device)
        rows.append({"mode": name, "tokens_per_s": tps})
    _, tps = timed_tokens(lambda: plain_decoder_run(model, prompt, n_new, "reduce-overhead", cpu), device)
    rows.append({"mode": "plain_compiled", "tokens_per_s": tps})
    return rows


def agreement_section(device: torch.device, cpu: bool) -> list[dict]:
    """A tiny model learns a repeating text for a few seconds; every fast path must give plain's tokens."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_embd=64, n_head=2, vocab_size=64, sequence_len=128, short_window=16, poe_every=1,
                    poe_mode="flat")
    with torch.device(device):
        model = GPT(cfg)
    model.init_weights()
    text = torch.tensor([(i * 7 + i // 5) % 61 for i in range(129 * 8)], device=device).view(8, 129)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15 if cpu else 150):
        model(text[:, :-1], text[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    prompt, n = text[0, :40].tolist(), 40  # past the S window of 16
    plain = Engine(model).generate(prompt, max_new_tokens=n, stop_token_ids=[]).tokens
    rows = [{"path": "speculative", "tokens_equal": Engine(model).generate(
        prompt, max_new_tokens=n, stop_token_ids=[], mode="speculative", draft_stage=0, gamma=4).tokens == plain},
            {"path": "plain_compiled", "tokens_equal": plain_decoder_run(model, prompt, n, "reduce-overhead", cpu) == plain}]
    for backend in ("flex", "flash"):
        try:
            with torch.no_grad():
                resolve_attention_backend(backend, device, torch.float32)
        except ValueError:
            continue  # (flash-attn is bf16/fp16 only)
        model.attention_backend = backend
        rows.append({"path": f"prefill_{backend}", "tokens_equal": Engine(model).generate(
            prompt, max_new_tokens=n, stop_token_ids=[]).tokens == plain})
    model.attention_backend = "auto"
    return rows


def hf_section(cpu: bool) -> dict:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "transformers is not installed"}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hf_vs_native

    argv = (["--model", "tiny", "--prompts", "1", "--prompt-tokens", "8", "--new-tokens", "8", "--repeats", "1"]
            if cpu else ["--model", "poe-1.3b", "--device", "cuda", "--dtype", "bf16", "--prompts", "1",
                         "--prompt-tokens", "128", "--new-tokens", "128", "--repeats", "2"])
    r = hf_vs_native.main(argv)
    return {"tokens_equal": r["identical_tokens"], "poelm_tokens_per_s": r["poelm_tokens_per_s"],
            "transformers_tokens_per_s": r["transformers_tokens_per_s"], "ratio": r["ratio"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU is visible; run with --cpu for the dry run")
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}, attention backend "
          f"{resolve_attention_backend('auto', device, torch.bfloat16 if device.type == 'cuda' else torch.float32)}",
          flush=True)
    report: dict = {"device": name, "torch": torch.__version__, "train": []}
    for shape, (config, rows) in shapes(args.cpu).items():
        if args.skip_small and shape == "gpu-small":
            continue
        for poe_mode in ("none", "flat"):
            r = train_row(shape, config, poe_mode, rows, device, args.cpu)
            report["train"].append(r)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            mem = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else "n/a"
            print(f"train {shape:>9} {r['arm']:>8}: {r['tokens_per_s']:>12,.0f} tok/s  step {r['step_s']:.3f} s  "
                  f"MFU {mfu}  peak memory {mem}", flush=True)
    report["projection"] = p = projection(report["train"])
    print(f"paper-d24 experiment ({', '.join(p['arms'])}): {p['hours_1_gpu']:.1f} h on 1 GPU, "
          f"{p['hours_4_gpus']:.1f} h on 4 ({p['assumes']})", flush=True)
    d24 = shapes(args.cpu)["d24" if args.cpu else "paper-d24"][0]
    report["decode"] = decode_section(GPTConfig(**{**d24.to_dict(), "poe_mode": "flat", "backout": None,
                                                   "poe_stage_layers": None}), device, args.cpu)
    for r in report["decode"]:
        print(f"decode {r['mode']:>15}: {r['tokens_per_s']:>9,.1f} tok/s", flush=True)
    report["agreement"] = agreement_section(device, args.cpu)
    print("agreement: " + ", ".join(f"{a['path']} {'same' if a['tokens_equal'] else 'DIFFERENT'}"
                                    for a in report["agreement"]), flush=True)
    report["hf"] = {"skipped": "--skip-hf"} if args.skip_hf else hf_section(args.cpu)
    report["ratios"] = ratios(report)
    report["wall_s"] = time.perf_counter() - t_start
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wall {report['wall_s']:.0f} s")
    print("ratios " + "  ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    return report


def ratios(report: dict) -> dict[str, float]:
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in report["train"]):
        arms = {r["arm"]: r for r in report["train"] if r["shape"] == shape}
        out[f"{shape} poe/bp step_time"] = arms["poe_flat"]["step_s"] / arms["bp"]["step_s"]
    dec = {r["mode"]: r["tokens_per_s"] for r in report["decode"]}
    for mode in ("plain_compiled", "stage0", "speculative", "wand"):
        out[f"decode {mode}/plain"] = dec[mode] / dec["plain"]
    if "ratio" in report["hf"]:
        out["poelm/transformers decode"] = report["hf"]["ratio"]
    return out


if __name__ == "__main__":
    main()
