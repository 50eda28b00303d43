"""Running the experiment: data and tokenizer, the arms (resumed or skipped when done), the
eval table and gap, the PoE inference modes, the specialist stage, then report and results.

    from poelm.experiment.run import run_experiment
    results = run_experiment(load_config("tiny", {}))
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from poelm.atomic import atomic_write_bytes, atomic_write_json
from poelm.jsonfile import read_json_object
from poelm.rundir import RESULT_NAME
from poelm.tracking import resolve_tracker
from poelm.experiment.config import (ARMS, PAPER, ExperimentConfig, alpha05_stop, fold_model_keys, load_config,
                                     trajectory_settings)
from poelm.experiment.report import experiment_plots, render_report
from poelm.experiment.specialist import run_specialist

# -----------------------------------------------------------------------------
# Steps


def ensure_data(cfg: ExperimentConfig, say) -> None:
    from poelm import corpus
    from poelm.tokenizer import Tokenizer, has_tokenizer

    data = Path(cfg.data)
    if not (data.is_dir() and any(data.glob("*.parquet"))):
        if cfg.data_source.startswith("climbmix:"):
            n = int(cfg.data_source.split(":", 1)[1])
            say(f"downloading {n} ClimbMix shards into {data} ...")
            corpus.download_climbmix(n, data)
        else:
            say(f"building the corpus {cfg.data_source!r} into {data} ...")
            corpus.build_corpus(cfg.data_source, data)
    train, val = corpus.list_shards(data)  # raises a clear error without a validation shard
    tok_dir = Path(cfg.tokenizer)
    if not has_tokenizer(tok_dir):
        say(f"training a {cfg.vocab_size}-token tokenizer into {tok_dir} ...")
        t0 = time.time()
        tok = Tokenizer.train(corpus.iter_documents(train), cfg.vocab_size)
        tok.save(tok_dir)
        say(f"tokenizer trained in {time.time() - t0:.1f} s")


def horizon(cfg: ExperimentConfig) -> int:
    """The arms' number of steps (as the trainer derives it when not given in steps)."""
    if cfg.num_iterations > 0:
        return cfg.num_iterations
    import torch

    from poelm.model import GPT
    from poelm.schedule import resolve_horizon
    from poelm.tokenizer import Tokenizer

    config = dataclasses.replace(cfg.model_config("none", 0.0), vocab_size=Tokenizer.load(cfg.tokenizer).vocab_size)
    with torch.device("meta"):
        params = GPT(config).num_params()
    return resolve_horizon(-1, cfg.target_tokens, cfg.target_param_data_ratio, params, cfg.total_batch_size)[0]


def arm_train_config(cfg: ExperimentConfig, arm: str):
    """The TrainConfig of one arm: the experiment's training settings, its data, tokenizer and the
    arm's model, in out/arms/ARM, resumed when it has a checkpoint."""
    from poelm.train import TrainConfig

    mode, alpha = next((m, a) for n, m, a in ARMS if n == arm)
    stop = None
    if arm == "poe_a05" and cfg.alpha05_stop_fraction < 1.0:
        stop = alpha05_stop(cfg, horizon(cfg))
    return TrainConfig(data=cfg.data, tokenizer=cfg.tokenizer, out=str(Path(cfg.out) / "arms" / arm),
                       model=cfg.model_config(mode, alpha), resume=True, stop_at=stop, **cfg.training())


def run_arm(cfg: ExperimentConfig, arm: str, say) -> dict:
    """Train one arm (resuming when it has a checkpoint); skip it when finished."""
    tc = arm_train_config(cfg, arm)
    done = Path(tc.out) / RESULT_NAME
    if done.exists():
        say(f"[{arm}] finished earlier: skipped")
        return read_json_object(done, f"arm {arm}'s result")
    say(f"[{arm}] training poe_mode={tc.model.poe_mode} alpha={tc.model.poe_alpha} -> {tc.out}")
    if cfg.nproc > 1:
        return run_arm_torchrun(tc, cfg.nproc)
    from poelm.train import train

    return train(tc)


def torchrun_argv(tc, nproc: int) -> list[str]:
    """The command that runs `poelm train` on `tc` under torchrun (its flags rebuild tc exactly)."""
    import sys

    from poelm.flags import model_flags, setting_flags, untrained_fields

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "poelm", "train",
            *setting_flags(tc, exclude=("model",)), *model_flags(tc.model, exclude=untrained_fields())]


def run_arm_torchrun(tc, nproc: int) -> dict:
    import subprocess

    subprocess.run(torchrun_argv(tc, nproc), check=True)
    return read_json_object(Path(tc.out) / RESULT_NAME, "the arm's result")


def eval_table(cfg: ExperimentConfig) -> dict[str, list[dict]]:
    """Eval records per arm from each arm's metrics.jsonl."""
    from poelm.plots import read_metrics

    return {arm: read_metrics(Path(cfg.out) / "arms" / arm)[1] for arm in cfg.arms}


def gap_trajectory(evals: dict[str, list[dict]], arm: str = "poe") -> list[dict]:
    """PoE-vs-BP gap in % of the BP bpb at every eval step both arms have."""
    bp = {r["step"]: r["bpb"] for r in evals.get("bp", [])}
    return [{"step": r["step"], "bp": bp[r["step"]], arm: r["bpb"], "gap_pct": 100 * (r["bpb"] / bp[r["step"]] - 1)}
            for r in evals.get(arm, []) if r["step"] in bp and r["step"] > 0]


def at_step(evals: dict[str, list[dict]], step: int) -> dict[str, float]:
    """Final-readout bpb of every arm that has an eval at this step."""
    return {arm: r["bpb"] for arm, recs in evals.items() for r in recs if r["step"] == step}


def alpha05_comparison(cfg: ExperimentConfig, results: dict) -> dict | None:
    """The alpha=0.5 arm against the others at the step it stopped at (as the paper's run)."""
    a05 = results["arms"].get("poe_a05")
    if not a05:
        return None
    step, total = a05["step"], a05.get("num_iterations", a05["step"])
    bpb = at_step(results["evals"], step)
    return {"step": step, "horizon": total, "fraction": step / total, "bpb": bpb,
            "gap_pct": {arm: 100 * (b / bpb["bp"] - 1) for arm, b in bpb.items() if arm != "bp" and "bp" in bpb}}


def reused_parts(cfg: ExperimentConfig) -> dict[str, str]:
    """Arms (and the specialist) finished by an earlier call, with when they finished (local time)."""
    done = {arm: Path(cfg.out) / "arms" / arm / RESULT_NAME for arm in cfg.arms}
    done["specialist"] = Path(cfg.out) / "specialist" / RESULT_NAME
    return {name: time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
            for name, path in done.items() if path.exists()}


def run_seeds(cfg: ExperimentConfig, evals: dict[str, list[dict]], say) -> dict:
    """Train the arms again for every further seed (poelm.experiment.seeds) and summarise all seeds."""
    from poelm.experiment.seeds import extra_seed_configs, seed_summary

    runs, seeds = [evals], [cfg.seed]
    for sub in extra_seed_configs(cfg):
        say(f"[seed {sub.seed}] the arms again -> {sub.out}")
        for arm in sub.arms:
            run_arm(sub, arm, say)
        runs.append(eval_table(sub))
        seeds.append(sub.seed)
    return seed_summary(runs, seeds)


def measure_inference(cfg: ExperimentConfig, say, show_progress: bool = False) -> dict:
    """PoE model: every mode against the best plain path (and the BP arm's plain speed) on
    validation and outside-text prompts; BP refusing the PoE modes."""
    from poelm.checkpoint import load_model
    from poelm.inference_bench import bp_refusals, measure_modes

    arms = Path(cfg.out) / "arms"
    result: dict = {}
    bp = load_model(arms / "bp") if (arms / "bp").exists() else None  # (model, tokenizer)
    if (arms / "poe").exists():
        model, tok = load_model(arms / "poe")
        say("[inference] timing plain, stage 0, WAND and speculative decoding (fixed and adaptive), eager and "
            "compiled, on the PoE arm and plain on the BP arm, then speculative sampled at T = 0.8 and at batch 8 "
            "against plain of the same setting: validation and outside-text prompts, 1 thread ...")
        result["poe"] = measure_modes(model, tok, cfg.data, n_prompts=cfg.decode_prompts,
                                      max_new_tokens=cfg.decode_tokens, model_dir=resolve(arms / "poe"), repeats=3,
                                      bp_model=bp and bp[0], compile=cfg.decode_compile, show_progress=show_progress)
        if result["poe"]["cpu"].get("contended"):
            say(f"[inference] warning: {result['poe']['cpu']['contended']}: the tokens/s are below this machine's")
    if bp is not None:
        result["bp_refusals"] = bp_refusals(*bp)
    return result


def backout_compat(cfg: ExperimentConfig) -> dict:
    """PoE arms: final bpb with the reference code's backout on the plain final path
    (which PoE training never saw) beside the default without it (docs/poe.md §2)."""
    from poelm.checkpoint import load_model
    from poelm.dataloader import val_batches
    from poelm.evaluate import evaluate_bpb

    out = {}
    for arm in cfg.arms:
        path = Path(cfg.out) / "arms" / arm
        if arm == "bp" or not path.exists():
            continue
        model, tok = load_model(path)
        row = {}
        for backout in (False, True):
            model.config.backout = backout
            batches = val_batches(cfg.data, tok, cfg.device_batch_size, cfg.model_config("flat", 0.0).sequence_len,
                                  cfg.eval_tokens)  # model on the CPU: None is the CPU budget
            row["with_backout" if backout else "without_backout"] = evaluate_bpb(model, batches, tok.token_bytes())["bpb"]
        out[arm] = row
    return out


def resolve(run_dir: Path) -> Path:
    from poelm.checkpoint import resolve_run_dir

    return resolve_run_dir(run_dir) or run_dir


def run_experiment(cfg: ExperimentConfig, quiet: bool = False) -> dict:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    resolve_tracker(cfg.tracker)  # its package is installed, before anything starts
    if cfg.seeds < 1:
        raise ValueError(f"seeds {cfg.seeds}: every arm trains at least once; give --seeds 1 or more")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "experiment.json"
    if saved.exists():
        # poelm 0.1 kept the model's keys flat
        old = fold_model_keys(read_json_object(saved, "the experiment's settings"), str(saved))
        old, now = trajectory_settings(old), trajectory_settings(dataclasses.asdict(cfg))
        diff = [k for k in old if old[k] != now.get(k)]
        if diff:
            raise ValueError(f"{out} holds an experiment with other settings ({', '.join(diff)}); "
                             "use another --out or rerun with the same settings to resume")
    atomic_write_json(saved, dataclasses.asdict(cfg))
    t0 = time.time()
    ensure_data(cfg, say)
    results = {"config": dataclasses.asdict(cfg), "model": cfg.model_config("flat", 0.0).to_dict(), "arms": {},
               "paper": PAPER}
    results["reused"] = reused_parts(cfg)
    results["resumed_arms"] = [a for a in cfg.arms if a in results["reused"]]
    results["started"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(t0))
    for arm in cfg.arms:
        results["arms"][arm] = run_arm(cfg, arm, say)
    evals = eval_table(cfg)
    results["evals"] = evals
    if cfg.seeds > 1:
        results["seeds"] = run_seeds(cfg, evals, say)
    results["gap"] = gap_trajectory(evals)
    results["gap_alpha05"] = gap_trajectory(evals, "poe_a05")
    results["alpha05_at_stop"] = alpha05_comparison(cfg, results)
    results["backout_compat"] = backout_compat(cfg)
    results["inference"] = measure_inference(cfg, say, show_progress=not quiet)
    results["specialist"] = run_specialist(cfg, say)
    results["wall_seconds"] = round(time.time() - t0, 1)
    results["machine"] = machine_description()
    results["commit"] = code_commit()
    atomic_write_json(out / "results.json", results)
    results["plots"] = [str(p) for p in experiment_plots(out, results)]
    atomic_write_bytes(out / "report.md", render_report(results).encode())
    atomic_write_json(out / "results.json", results)
    say(f"report: {out / 'report.md'}")
    return results


def code_commit() -> str | None:
    """The git commit of the poelm sources that ran (with "+changes" when they differ from it);
    None outside a git checkout."""
    import subprocess

    src = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine_description() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, fp32"
