"""The researcher's toolkit (issue 18): every readout's downstream scores from one trunk pass
per batch (poelm.lm_eval_model, poelm.downstream, `poelm eval --tasks`, `poelm compare
--tasks`), experiment tracking (`--tracker`), seeds with error bars and SFT batch defaults.

The lm-eval tasks are shipped in tests/data/lm_eval/ (a loglikelihood, a multiple-choice and a
greedy-generation task over tiny jsonl files) and run offline with that directory as the
working directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from poelm.checkpoint import save_model
from poelm.cli import main
from poelm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval"
TOLERANCE = 1e-4


def synthetic_texts(n: int = 200) -> list[str]:
    import random

    words = "the quick brown fox jumps over lazy dog cat sat on mat hat in sun while birds sing songs of joy".split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(30)) + f". Line {i}!\n" for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(synthetic_texts(), vocab_size=300)


def write_model(tmp_path: Path, tokenizer, make_model, poe_mode: str = "flat", name: str = "model",
                seed: int = 3) -> Path:
    model = make_model(seed=seed, vocab_size=tokenizer.vocab_size, sequence_len=64, poe_mode=poe_mode)
    return save_model(model, tmp_path / name, tokenizer)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """lm-eval offline, its data sets cached under tmp_path, the task files' directory as cwd."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    monkeypatch.chdir(TASK_DIR)


def docs(name: str) -> list[dict]:
    return [json.loads(l) for l in (TASK_DIR / f"{name}.jsonl").read_text().splitlines() if l.strip()]


def poelm_scores(model, tok, context: str, continuation: str) -> dict[str, float]:
    """poelm's own scoring: the sum of the continuation's log-probs under every readout
    (GPT.token_nats on the whole text, lm-eval's tokenisation: <|bos|>, trailing spaces moved, a
    text longer than the context keeps its last tokens)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = [tok.bos_token_id, *tok.encode(stripped + continuation)]
    n_cont = len(whole) - 1 - len(tok.encode(stripped))
    ids = torch.tensor([whole[-(model.config.sequence_len + 1):]])
    nats = model.token_nats(ids[:, :-1], ids[:, 1:])
    span = slice(-n_cont, None)
    out = {"final": -float(nats["final"][0, span].sum()), "logop": -float(nats["logop"][0, span].sum())}
    out.update({f"stage{k}": -float(s[0, span].sum()) for k, s in enumerate(nats["stages"])})
    return out


# -----------------------------------------------------------------------------
# lm-eval: every readout from one trunk pass per batch

lm_eval = pytest.importorskip("lm_eval")


def test_scorer_equals_poelm_scoring_with_one_pass_per_batch(tmp_path, tokenizer, make_model):
    from poelm.checkpoint import load_model
    from poelm.lm_eval_model import PoelmLM, ReadoutScorer

    model, tok = load_model(write_model(tmp_path, tokenizer, make_model))
    scorer = ReadoutScorer(model, tok, batch_size=3)
    assert scorer.readouts == ["stage0", "stage1", "stage2", "stage3", "logop", "final"]
    pairs = [(d["context"], d["continuation"]) for d in docs("poe_tiny")]

    class Request:
        def __init__(self, args):
            self.args = args

    first = PoelmLM(readout="stage0", scorer=scorer).loglikelihood([Request(p) for p in pairs])
    passes = scorer.passes
    assert passes == -(-len(pairs) // 3)  # one trunk pass per batch of 3
    by_readout = {r: PoelmLM(readout=r, scorer=scorer).loglikelihood([Request(p) for p in pairs])
                  for r in scorer.readouts}
    assert scorer.passes == passes  # the other readouts came from the cache
    assert by_readout["stage0"] == first
    for i, (context, continuation) in enumerate(pairs):
        want = poelm_scores(model, tok, context, continuation)
        for r in scorer.readouts:
            assert abs(by_readout[r][i][0] - want[r]) < TOLERANCE, (r, context)
    assert len({round(by_readout[r][0][0], 6) for r in scorer.readouts}) > 3  # the readouts really differ


def test_bp_model_final_only_unless_forced(tmp_path, tokenizer, make_model):
    from poelm.checkpoint import load_model
    from poelm.lm_eval_model import PoelmLM, ReadoutScorer, readout_label

    model, tok = load_model(write_model(tmp_path, tokenizer, make_model, poe_mode="none"))
    assert ReadoutScorer(model, tok).readouts == ["final"]
    with pytest.raises(ValueError, match="force=True"):
        PoelmLM(readout="stage0", scorer=ReadoutScorer(model, tok))
    forced = ReadoutScorer(model, tok, force=True)
    assert "stage0" in forced.readouts and "logop" in forced.readouts
    assert readout_label("stage0", model) == "stage0 (BP, not a predictor)"
    assert readout_label("final", model) == "final"


def test_poelm_eval_tasks_every_readout(tmp_path, tokenizer, make_model, offline, capsys):
    from poelm.checkpoint import load_model

    model_dir = write_model(tmp_path, tokenizer, make_model)
    rc = main(["eval", str(model_dir), "--tasks", "poe_tiny,poe_choice,poe_gen", "--include-path", str(TASK_DIR),
               "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["readouts"] == ["stage0", "stage1", "stage2", "stage3", "logop", "final"]
    model, tok = load_model(model_dir)
    n_requests = len(docs("poe_tiny")) + sum(len(d["choices"]) for d in docs("poe_choice"))
    assert result["trunk_passes"] <= -(-n_requests // 8) + 2  # batches of 8 (lm-eval groups per task), not x6
    # multiple choice: accuracy = the share of questions whose answer has the highest log-likelihood
    for r in result["readouts"]:
        hits = 0
        for d in docs("poe_choice"):
            lls = [poelm_scores(model, tok, d["question"], c)[r] for c in d["choices"]]
            hits += max(range(len(lls)), key=lls.__getitem__) == d["answer"]
        assert result["tasks"]["poe_choice"][r]["acc"] == pytest.approx(hits / len(docs("poe_choice")))
        assert 0.0 <= result["tasks"]["poe_gen"][r]["exact_match"] <= 1.0
    # loglikelihood task: perplexity = exp(-mean log-likelihood) of poelm's own scores
    import math
    for r in result["readouts"]:
        lls = [poelm_scores(model, tok, d["context"], d["continuation"])[r] for d in docs("poe_tiny")]
        want = math.exp(-sum(lls) / len(lls))
        assert result["tasks"]["poe_tiny"][r]["perplexity"] == pytest.approx(want, rel=1e-4)


def test_generation_matches_the_engine(tmp_path, tokenizer, make_model):
    from poelm.checkpoint import load_model
    from poelm.engine import Engine
    from poelm.lm_eval_model import ReadoutScorer

    model, tok = load_model(write_model(tmp_path, tokenizer, make_model))
    scorer = ReadoutScorer(model, tok)
    got = scorer.generate("the cat sat on the", [], 6, "stage1")
    want = Engine(model, tok).generate("the cat sat on the", mode="stage", stage=1, max_new_tokens=6,
                                       stop_token_ids=None).text
    assert got == want
    if want.strip():
        stop = want.strip()[0]
        assert stop not in scorer.generate("the cat sat on the", [stop], 6, "stage1")


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'"),
    (["--tasks", ","], "--tasks"),
])
def test_eval_tasks_bad_input(tmp_path, tokenizer, make_model, offline, capsys, argv, message):
    model_dir = write_model(tmp_path, tokenizer, make_model)
    rc = main(["eval", str(model_dir), "--include-path", str(TASK_DIR), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_eval_tasks_unparsable_task_file(tmp_path, tokenizer, make_model, offline, capsys):
    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\n  output_type: [unclosed\n")
    rc = main(["eval", str(tmp_path / "not_loaded"), "--tasks", "broken", "--include-path", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "broken.yaml does not parse" in err and len(err.strip().splitlines()) == 1, err


def test_compare_tasks_paper_table_and_png(tmp_path, tokenizer, make_model, offline, capsys):
    bp = write_model(tmp_path, tokenizer, make_model, poe_mode="none", name="bp", seed=5)
    poe = write_model(tmp_path, tokenizer, make_model, name="poe", seed=6)
    png = tmp_path / "tasks.png"
    rc = main(["compare", str(bp), str(poe), "--tasks", "poe_choice", "--include-path", str(TASK_DIR),
               "--plot", str(png), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    row = result["rows"][0]
    assert row["task"] == "poe_choice" and row["metric"] == "acc"
    bp_run, poe_run = result["runs"]
    assert bp_run["readouts"] == ["final"] and "stage0" in poe_run["readouts"]
    assert row["points"] == [100 * bp_run["tasks"]["poe_choice"]["final"]["acc"],
                             100 * poe_run["tasks"]["poe_choice"]["final"]["acc"]]
    assert row["difference"] == pytest.approx(row["points"][1] - row["points"][0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -----------------------------------------------------------------------------
# Experiment tracking

from test_train import env, records, train_args  # noqa: E402,F401  (tests/ is on sys.path; env is a fixture)


def test_flatten_names_every_metric():
    from poelm.tracking import flatten

    got = flatten({"type": "eval", "step": 4, "bpb": 2.0, "stages": [2.5, 2.1], "logop": 2.2, "mfu": None,
                   "base": {"assistant_bits": 1.5}, "note": "text"})
    assert got == {"eval/bpb": 2.0, "eval/stages/0": 2.5, "eval/stages/1": 2.1, "eval/logop": 2.2,
                   "eval/base/assistant_bits": 1.5}


@pytest.mark.parametrize("command", ["train", "sft", "experiment"])
def test_tracker_flag_on_all_three(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--tracker {none,tensorboard,wandb}" in out
    assert "POELM_TRACKER" in out or command == "experiment"  # (there: the preset's, which is unset)


def hide_package(monkeypatch, package: str) -> None:
    """Make `package` look uninstalled to importlib.util.find_spec (what poelm.tracking asks)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == package else real(name, *a, **k))


def test_tracker_without_its_package_is_one_line_and_starts_nothing(env, tmp_path, capsys, monkeypatch):
    hide_package(monkeypatch, "wandb")
    out = tmp_path / "run"
    rc = main(train_args(env, out, tracker="wandb"))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--tracker wandb needs the wandb package" in err and "pip install 'poelm[track]'" in err
    assert not out.exists()
    monkeypatch.setenv("POELM_TRACKER", "mlflow")
    rc = main(train_args(env, out))
    err = capsys.readouterr().err
    assert rc == 2 and "POELM_TRACKER='mlflow': choose one of none, tensorboard, wandb" in err
    assert not out.exists()


def test_tensorboard_reads_back(env, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("POELM_TRACKER", "tensorboard")  # the environment default
    out = tmp_path / "tb"
    assert main(train_args(env, out)) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/stage_losses/0", "train/tokens_per_s", "train/lr/matrix", "eval/bpb",
                "eval/stages/1", "eval/logop"):
        assert tag in tags, tags
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in records(out, "train")})
    evals = {e.step: e.value for e in events.Scalars("eval/logop")}
    assert evals == pytest.approx({r["step"]: r["logop"] for r in records(out, "eval")})
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"total_batch_size": 128' in config and '"poe_mode": "flat"' in config


def test_wandb_offline_reads_back(env, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert main(train_args(env, out, tracker="wandb")) == 0
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history, config = {}, {}
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
        elif kind == "run":  # the run's start: its config
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    train, evals = records(out, "train"), records(out, "eval")
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == \
        pytest.approx({r["step"]: r["loss"] for r in train})
    assert {s: h["eval/stages/1"] for s, h in history.items() if "eval/stages/1" in h} == \
        pytest.approx({r["step"]: r["stages"][1] for r in evals})
    assert all("train/lr/matrix" in h for s, h in history.items() if "train/loss" in h)
    assert config["total_batch_size"] == 128 and config["model"]["poe_mode"] == "flat"


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (a 7-byte header, then records in
    LevelDB's log format: 32 KiB blocks of chunks with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # the zero padding at the end of a block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_experiment_tracker_refused_before_anything(tmp_path, capsys, monkeypatch):
    hide_package(monkeypatch, "tensorboard")
    out = tmp_path / "exp"
    rc = main(["experiment", "tiny", "--out", str(out), "--data", str(tmp_path / "data"), "--tracker", "tensorboard"])
    err = capsys.readouterr().err
    assert rc == 2 and "--tracker tensorboard needs the tensorboard package" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "data").exists()


# -----------------------------------------------------------------------------
# Seeds with error bars

from test_experiment import micro  # noqa: E402,F401  (a fixture: the micro experiment config)


def evals_of(bp: list[float], poe: list[float], a05: list[float]) -> dict:
    """Eval records per arm at steps 0, 2, 4 (2 stages each)."""
    rec = lambda step, b: {"step": step, "bpb": b, "stages": [b + 0.2, b], "logop": b + 0.1}  # noqa: E731
    return {arm: [rec(s, b) for s, b in zip((0, 2, 4), vals)] for arm, vals in
            (("bp", bp), ("poe", poe), ("poe_a05", a05))}


def test_seed_summary_mean_std_band_and_orderings():
    from poelm.experiment.seeds import seed_summary

    runs = [evals_of([3.0, 2.0, 1.00], [3.0, 2.1, 1.10], [3.0, 2.1, 1.101]),
            evals_of([3.0, 2.0, 1.02], [3.0, 2.1, 1.12], [3.0, 2.1, 1.118]),
            evals_of([3.0, 2.0, 0.98], [3.0, 2.1, 1.08], [3.0, 2.1, 1.082])]
    s = seed_summary(runs, [42, 43, 44])
    assert s["finals"]["bp"]["final"]["mean"] == pytest.approx(1.0)
    assert s["finals"]["bp"]["final"]["std"] == pytest.approx(0.02)
    assert s["finals"]["poe"]["stages"][0]["mean"] == pytest.approx(1.3)
    gaps = [100 * (1.10 / 1.00 - 1), 100 * (1.12 / 1.02 - 1), 100 * (1.08 / 0.98 - 1)]
    assert s["gap_pct"]["poe"]["mean"] == pytest.approx(sum(gaps) / 3)
    assert [b["step"] for b in s["gap_band"]["poe"]] == [2, 4]
    assert s["gap_band"]["poe"][0] == pytest.approx({"step": 2, "mean": 5.0, "std": 0.0, "n": 3})
    bp_vs_poe, alpha = s["orderings"]["bp_vs_poe"], s["orderings"]["alpha"]
    assert bp_vs_poe["exceeds_noise"] and bp_vs_poe["verdict"].startswith("BP better than PoE α=0 by 0.1000 bpb")
    assert not alpha["exceeds_noise"] and "within the seed noise" in alpha["verdict"]  # +0.001, -0.002, +0.002



def test_seed_summary_compares_an_early_stopped_arm_at_its_own_step():
    """The α=0.5 arm stops early (53 % of the schedule): its gap to BP and its ordering against α=0
    are taken at the step it stopped at, never against the other arms' final step."""
    from poelm.experiment.seeds import seed_summary, seed_report

    runs = []
    for shift in (0.0, 0.01, -0.01):
        ev = evals_of([3.0, 2.0 + shift, 1.0 + shift], [3.0, 2.1 + shift, 1.1 + shift], [3.0, 2.2 + shift, 9.9])
        ev["poe_a05"] = ev["poe_a05"][:2]  # stopped at step 2
        runs.append(ev)
    s = seed_summary(runs, [1, 2, 3])
    assert s["final_steps"] == {"bp": 4, "poe": 4, "poe_a05": 2}
    gaps = [100 * ((2.2 + d) / (2.0 + d) - 1) for d in (0.0, 0.01, -0.01)]
    assert s["gap_pct"]["poe_a05"]["values"] == pytest.approx(gaps)
    assert s["orderings"]["alpha"]["mean"] == pytest.approx(0.1)  # 2.2 - 2.1 at step 2, every seed
    assert s["orderings"]["alpha"]["verdict"].startswith("PoE α=0 better than PoE α=0.5 by 0.1000 bpb")
    report = "\n".join(seed_report(s))
    assert "final gap PoE α=0.5 vs BP (step 2)" in report and "α=0 vs α=0.5 (step 2)" in report


def test_one_seed_report_states_the_measured_noise_of_its_preset(tmp_path, monkeypatch, micro):
    """A one-seed run states the seed noise recorded for its preset by a multi-seed run
    (scripts/record_seed_noise.py), and only when it ran with the settings that were measured."""
    import dataclasses
    import poelm.experiment.seeds as seeds
    from poelm.experiment.config import trajectory_settings

    runs = [evals_of([3.0, 2.0, 1.00 + d], [3.0, 2.1, 1.10 + d], [3.0, 2.1, 1.10 + d]) for d in (0.0, 0.02, -0.02)]
    config = json.loads(json.dumps(dataclasses.asdict(micro)))
    record = {micro.name: {"measured": "2026-12-05 15:00", "commit": "abc1234",
                           "settings": trajectory_settings(config), "summary": seeds.seed_summary(runs, [1, 2, 3])}}
    monkeypatch.setattr(seeds, "MEASURED_NOISE", tmp_path / "noise.json")
    (tmp_path / "noise.json").write_text(json.dumps(record))
    here = evals_of([3.0, 2.0, 1.0], [3.0, 2.1, 1.5], [3.0, 2.1, 1.1])  # a gap of +50 %: far outside
    lines = "\n".join(seeds.measured_noise_report(config, here))
    assert f"## Seed noise of the `{micro.name}` preset (measured: 3 seeds, 2026-12-05 15:00, commit abc1234)" in lines
    assert "| bp | 1.0000 ± 0.0200 |" in lines
    assert "this run's +50.00 % is outside 2 std of that mean" in lines
    assert "BP vs PoE α=0: BP better than PoE α=0 by 0.1000 bpb, beyond the seed noise" in lines
    other = {**config, "seed": config["seed"] + 1}  # other settings: the record does not apply
    assert "does not apply here" in "\n".join(seeds.measured_noise_report(other, here))
    config["out"] = "elsewhere"  # where a run writes is not a trajectory setting
    assert "does not apply" not in "\n".join(seeds.measured_noise_report(config, here))

def test_experiment_seeds_end_to_end(micro):
    import poelm.experiment as exp

    micro.arms, micro.seeds, micro.specialist_steps = ["bp", "poe"], 2, 0
    results = exp.run_experiment(micro, quiet=True)
    out = Path(micro.out)
    s = results["seeds"]
    assert s["seeds"] == [micro.seed, micro.seed + 1]
    second = out / "seeds" / f"seed{micro.seed + 1}" / "arms"
    again = [json.loads(l) for l in (second / "poe" / "metrics.jsonl").read_text().splitlines()]
    finals = [results["evals"]["poe"][-1]["bpb"], [r for r in again if r["type"] == "eval"][-1]["bpb"]]
    assert finals[0] != finals[1]  # another seed, another run
    assert s["finals"]["poe"]["final"]["values"] == finals
    assert s["finals"]["poe"]["final"]["mean"] == pytest.approx(sum(finals) / 2)
    report = (out / "report.md").read_text()
    assert "## Seeds: mean ± std over 2 seeds" in report and "- BP vs PoE α=0: " in report
    assert "final gap PoE α=0 vs BP" in report
    assert (out / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_zero_is_one_line(tmp_path, capsys):
    rc = main(["experiment", "tiny", "--seeds", "0", "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err
    assert rc == 2 and "--seeds" in err and "must be >= 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "exp").exists()


# -----------------------------------------------------------------------------
# SFT batch defaults

import test_sft  # noqa: E402


@pytest.fixture(scope="module")
def sft_env(tmp_path_factory):
    """A PoE base (model directory, 32-token context) and a chat set of 54 training conversations."""
    from poelm.chatdata import build_chat_data
    from poelm.model import GPT, GPTConfig

    root = tmp_path_factory.mktemp("sft_batch")
    tok = Tokenizer.train([f"Recite verse {i}. " + " ".join(test_sft.WORDS) for i in range(40)], 300)
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=tok.vocab_size, sequence_len=32, poe_every=1,
                         window_pattern="L"))
    base.init_weights()
    save_model(base, root / "base", tok)
    build_chat_data(str(test_sft.recall_jsonl(root / "recall.jsonl")), root / "chat", val_fraction=0.1)
    return root


def sft_argv(sft_env: Path, model: Path, out: Path, *extra: str) -> list[str]:
    argv = test_sft.sft_args(sft_env, out, model=model)
    for flag in ("--total-batch-size", "--device-batch-size", "--quiet"):  # no batch flags: the defaults
        i = argv.index(flag)
        del argv[i:i + (1 if flag == "--quiet" else 2)]
    return argv + list(extra)


def with_trainer_state(src: Path, dst: Path, total: int, device_batch: int) -> Path:
    """A copy of the model directory `src` with the trainer state a training run's checkpoint keeps."""
    import shutil

    shutil.copytree(src, dst)
    (dst / "trainer.json").write_text(json.dumps({"step": 10, "train_config": {
        "total_batch_size": total, "device_batch_size": device_batch}}))
    return dst


def test_sft_inherits_the_base_runs_batch(sft_env, tmp_path, capsys):
    base = with_trainer_state(sft_env / "base", tmp_path / "base_run", total=256, device_batch=4)
    out = tmp_path / "sft"
    assert main(sft_argv(sft_env, base, out, "--num-iterations", "2")) == 0
    text = capsys.readouterr().out
    assert "batch: 256 tokens per step, device batch 4, from the base run's 256 tokens per step" in text
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["total_batch_size"], saved["device_batch_size"]) == (256, 4)
    conversations, rows = 54, 256 // 32  # 60 conversations, 6 held out; rows of the 32-token context
    assert f"{rows / conversations:.3g} epochs per step ({rows} conversations of {conversations})" in text


def test_sft_derives_the_batch_from_the_chat_set_and_warns(sft_env, tmp_path, capsys):
    from poelm.sft import sft_batch

    total, per_pass, source = sft_batch(str(sft_env / "base"), str(sft_env / "chat"), None)
    assert (total, per_pass) == (6 * 32, 6) and "54 conversations" in source  # 54 // 8 = 6 rows of 32 tokens
    assert sft_batch(str(sft_env / "base"), str(sft_env / "chat"), 16, total=None, device_batch=3)[:2] == (96, 3)
    out = tmp_path / "big"
    with pytest.warns(UserWarning, match=r"one step holds 2\.37 epochs of the 54 training conversations"):
        assert main(sft_argv(sft_env, sft_env / "base", out, "--total-batch-size", str(128 * 32),
                             "--device-batch-size", "64", "--num-iterations", "1", "--eval-every", "0")) == 0
    assert "2.37 epochs per step (128 conversations of 54)" in capsys.readouterr().out
