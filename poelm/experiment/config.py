"""The experiment's settings: the three arms, the experiment presets (EXPERIMENTS: tiny,
cpu-long, gpu-small, paper-d24), TOML/YAML files and flag overrides folded into one
ExperimentConfig, whose training settings are TrainConfig's own fields (ArmTraining).

    from poelm.experiment.config import load_config
    cfg = load_config("tiny", {"num_iterations": 200})
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

from poelm.jsonfile import check_field, read_text
from poelm.model import GPTConfig

# The paper's figures (docs/poe.md §1, docs/training.md): d24, 27.7 B ClimbMix tokens.
PAPER = {"bp_bpb": 0.676788, "poe_bpb": 0.720935, "gap_pct_final": 6.52, "gap_pct_step1000": 4.32,
         "speculative_speedup": 1.87, "speculative_acceptance": 0.88, "wand_speedup": 1.82,
         "wand_agreement": 1.0, "stage0_cost_ratio": 4.0, "alpha05_stop_step": 14000, "horizon_steps": 26430}
ARMS = (("bp", "none", 0.0), ("poe", "flat", 0.0), ("poe_a05", "flat", 0.5))


# TrainConfig fields an experiment sets itself: data, tokenizer and out are the experiment's own
# (each arm trains in out/arms/ARM), the model is `model` below, every arm resumes, and arms of
# different objectives cannot start from one model's weights (init); the alpha=0.5 arm's stop is
# alpha05_stop_fraction below (stop_at)
EXPERIMENT_OWN = ("data", "tokenizer", "out", "model", "resume", "init", "stop_at")
# the experiment's defaults where they are not TrainConfig's
TRAINING_DEFAULTS = {"total_batch_size": 8192, "eval_every": 50, "save_every": 50}


def _arm_training() -> type:
    """Every TrainConfig field an experiment may set for its arms, with its metadata (its help,
    choices and type), generated from TrainConfig so a new training setting needs no edit here."""
    from poelm.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return dataclasses.make_dataclass("ArmTraining", [
        (f.name, hints[f.name], field(default=TRAINING_DEFAULTS.get(f.name, f.default), metadata=f.metadata))
        for f in dataclasses.fields(TrainConfig) if f.name not in EXPERIMENT_OWN])


ArmTraining = _arm_training()


# settings that change neither an arm's trajectory nor its evals: a rerun may differ in these
NOT_TRAJECTORY = ("out", "arms", "decode_tokens", "decode_prompts", "decode_compile", "tracker", "seeds")


def trajectory_settings(cfg: dict) -> dict:
    """An experiment's settings (dataclasses.asdict form) without NOT_TRAJECTORY, the model as
    GPTConfig resolves it (defaults spelt out): equal dicts train equal arms."""
    kept = {k: v for k, v in json.loads(json.dumps(cfg)).items() if k not in NOT_TRAJECTORY}
    kept["model"] = GPTConfig(**kept["model"]).to_dict()
    return kept


@dataclass
class ExperimentConfig(ArmTraining):
    """The experiment's settings: the training settings of every arm (ArmTraining: TrainConfig's
    fields) and its own below."""
    name: str = "tiny"
    out: str = "runs/experiment"
    data_source: str = "default"  # "default", a folder of txt/jsonl/parquet, or "climbmix:N"
    data: str = "data/default"
    tokenizer: str = "data/tokenizer"
    vocab_size: int = 4096  # of the tokenizer the experiment trains; the models take its vocabulary
    # GPTConfig fields shared by every arm (each arm sets poe_mode and poe_alpha itself); fields
    # left out take GPTConfig's defaults and derivations
    model: dict = field(default_factory=dict)
    # the alpha=0.5 arm stops at this fraction of the horizon under the full schedule (the paper's run
    # stopped at step 14,000 of 26,430) and is compared with the others at that step; 1: not stopped
    alpha05_stop_fraction: float = PAPER["alpha05_stop_step"] / PAPER["horizon_steps"]
    arms: list[str] = field(default_factory=lambda: [a[0] for a in ARMS])
    decode_tokens: int = 128  # new tokens per prompt in the inference-mode measurement
    decode_prompts: int = 4
    decode_compile: bool = True  # also time the compiled paths (speeds are over the faster plain path)
    # the specialist stage (docs/poe.md section 7) on the PoE arm; 0 steps: off
    specialist_steps: int = 0
    specialist_layers: int = 1
    specialist_data: str = "data/recall"
    specialist_row_len: int = 96  # tokens per conversation row (a verse and its prompt fit)
    specialist_batch_rows: int = 16
    specialist_eval_prompts: int = 32
    nproc: int = 1  # >1: the arms run under torchrun with this many processes
    seeds: int = 1  # each arm trains this many times, seed, seed + 1, ... (poelm.experiment.seeds)
    compute_note: str = ""

    def training(self) -> dict:
        """The TrainConfig fields every arm takes from the experiment (ArmTraining's)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ArmTraining)}

    def model_config(self, poe_mode: str, poe_alpha: float) -> GPTConfig:
        """The model of one arm (vocab_size is replaced by the tokenizer's when it trains)."""
        try:
            return GPTConfig(**self.model, poe_mode=poe_mode, poe_alpha=poe_alpha, vocab_size=self.vocab_size)
        except TypeError as e:  # a key that is not a GPTConfig field
            raise ValueError(f"experiment model settings: {e}") from None


EXPERIMENTS: dict[str, dict] = {
    # About 30 minutes on 2 quiet CPU cores (fp32): depth 8 in 4 stages of 2 layers (so a stage costs more
    # than a WAND exit test and a draft stage is a quarter of the model), 3 arms x 226 steps x 8,192 tokens
    # (1.85 M tokens per arm; the alpha=0.5 arm stops at step 120, 53 %, as the paper's did), then a 1-layer
    # specialist on the PoE arm, 200 SFT steps on the recall chat set. Evals every 40 steps land on step 120.
    # Literal LRs (lr_scaling off): nanochat's rules would put s_B = sqrt(8192 / 2^19) = 1/8 on every LR
    # and start the Muon wd at 0.82 (its d12 has 24x the scaling params): too slow and too strong for
    # a few hundred steps. These are the values tuned for the 4 x 128 version of this preset on its BP arm
    # alone, as the paper's were (all arms use them): the flags x (128/768)^-0.5 on every AdamW LR, Muon
    # lr 0.02, wd 0.2, then the four LRs x a factor, 300 steps, final BP val bpb
    # x1 1.5858 | x2 1.5447 | x3 1.5640 | x4 1.5653; x2 taken (not re-swept at depth 8: same width).
    "tiny": dict(name="tiny", model=dict(n_layer=8, n_embd=128, n_head=2, sequence_len=256, poe_every=2),
                 vocab_size=1024,
                 total_batch_size=8192, device_batch_size=32, num_iterations=226, eval_every=40,
                 eval_tokens=2 ** 16, save_every=40, tokenizer="data/tokenizer-1k",
                 lr_scaling="off", matrix_lr=0.04, embedding_lr=1.47, unembedding_lr=0.0392, scalar_lr=2.45,
                 weight_decay=0.2, specialist_steps=200, decode_tokens=128,
                 compute_note="about 30 minutes on 2 quiet CPU cores (fp32), specialist and inference included"),
    # A wider model for longer on CPU: depth 8, 256 wide, 4 x 2 stages, 9.8 M tokens per arm.
    # Literal LRs (lr_scaling off) for the same reason as tiny: flags x (256/768)^-0.5 on the AdamW LRs.
    "cpu-long": dict(name="cpu-long", model=dict(n_layer=8, n_embd=256, n_head=4, sequence_len=512, poe_every=2),
                     vocab_size=4096,
                     total_batch_size=16384, device_batch_size=16, num_iterations=600, eval_every=100,
                     eval_tokens=2 ** 17, save_every=100, tokenizer="data/tokenizer-4k",
                     lr_scaling="off", matrix_lr=0.02, embedding_lr=0.52, unembedding_lr=0.0139, scalar_lr=0.866,
                     weight_decay=0.2,
                     compute_note="9.8 M tokens per arm: a few hours on 2 CPU cores"),
    # One GPU (bf16): d12, 4 x 3 stages, 32k vocab, ~20 tokens per parameter on ClimbMix or any corpus.
    "gpu-small": dict(name="gpu-small", model=dict(n_layer=12, sequence_len=2048, poe_every=3), vocab_size=32768,
                      total_batch_size=2 ** 19, device_batch_size=32, target_param_data_ratio=20.0,
                      eval_every=250, save_every=500, data_source="climbmix:40",
                      data="data/climbmix", tokenizer="data/tokenizer-32k",
                      compute_note="d12 (~0.29 B params incl. value embeddings), ~5.8 B tokens per arm: "
                                   "about 3-4 H100-hours per arm"),
    # The released setting: d24, 4 x 6, ClimbMix, 20 tokens per total parameter, 2^20 tokens per step.
    "paper-d24": dict(name="paper-d24", model=dict(n_layer=24, sequence_len=2048, poe_every=6), vocab_size=32768,
                      total_batch_size=2 ** 20, device_batch_size=16, target_param_data_ratio=20.0,
                      eval_every=1000, save_every=1000, data_source="climbmix:170",
                      data="data/climbmix", tokenizer="data/tokenizer-32k", nproc=8,
                      compute_note="1.384 B params x 27.7 B tokens per arm: ~4.78e9 FLOPs/token x 27.7e9 x 3 "
                                   "(fwd+bwd already in the 6N) = 1.3e20 FLOPs per arm; at 40% MFU on 8 H100s "
                                   "about 12 hours per arm, ~100 H100-hours per arm"),
}


# -----------------------------------------------------------------------------
# Config loading


def fold_model_keys(settings: dict, where: str) -> dict:
    """Move GPTConfig fields given at the top level (or by their nanochat names depth /
    seq_len) into settings["model"]; poe_mode / poe_alpha belong to the arms."""
    from poelm.flags import FLAG_ALIASES

    model_fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    aliases = {flag[2:].replace("-", "_"): name for name, flags in FLAG_ALIASES.items() for flag in flags}
    out = {k: v for k, v in settings.items() if k != "model"}
    model = dict(check_field(settings, "model", dict, where, "give the model settings as a table",
                             required=False) or {})
    for key in list(out):
        name = aliases.get(key, key)
        if name in model_fields:
            value = out.pop(key)
            if value is not None:
                model[name] = value
    model = {aliases.get(k, k): v for k, v in model.items()}
    for key in ("poe_mode", "poe_alpha"):
        if key in model:
            raise ValueError(f"{where}: {key} is set by each arm (see `arms`), not for the experiment")
    if "poe_stage_layers" in model:
        model.pop("poe_every", None)
    out["model"] = model
    return out


def load_config(preset_or_file: str | None, overrides: dict) -> ExperimentConfig:
    name = preset_or_file or "tiny"
    if name in EXPERIMENTS:
        base = dict(EXPERIMENTS[name])
    elif os.path.isfile(name):
        base = read_experiment_file(name)
    else:
        raise ValueError(f"unknown experiment preset or file {name!r}; presets: {', '.join(EXPERIMENTS)}")
    base = fold_model_keys(base, name)
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))} and "
                         "the GPTConfig fields")
    check_settings(base, name)
    overrides = fold_model_keys(overrides, "overrides")
    base.update({k: v for k, v in overrides.items() if v is not None and k != "model"})
    base["model"] = {**base["model"], **overrides["model"]}
    base.setdefault("out", f"runs/{base.get('name', name)}")
    cfg = ExperimentConfig(**base)
    try:
        cfg.model_config("flat", 0.0)  # every model field is checked now, before any work
    except ValueError as e:
        raise ValueError(f"{name}: model: {e}") from None
    bad = [a for a in cfg.arms if a not in {n for n, _, _ in ARMS}]
    if bad:
        raise ValueError(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(n for n, _, _ in ARMS)}")
    check_stop(cfg, name)
    return cfg


def alpha05_stop(cfg: ExperimentConfig, horizon: int) -> int:
    """The step the alpha=0.5 arm stops at: the eval step nearest alpha05_stop_fraction of the
    horizon (so every arm has an eval there to compare), at least one eval in, at most the horizon."""
    target = cfg.alpha05_stop_fraction * horizon
    every = cfg.eval_every if 0 < cfg.eval_every < horizon else 1
    return min(horizon, every * max(1, round(target / every)))


def check_stop(cfg: ExperimentConfig, where: str) -> None:
    """Refuse an alpha05_stop_fraction outside (0, 1] in one line naming it."""
    if not 0.0 < cfg.alpha05_stop_fraction <= 1.0:
        raise ValueError(f"{where}: alpha05_stop_fraction {cfg.alpha05_stop_fraction}: give a fraction in (0, 1], "
                         "e.g. 0.53 (the paper's 14,000 of 26,430 steps) or 1 to train the alpha=0.5 arm in full")


def read_experiment_file(path: str) -> dict:
    """The settings table of a TOML or YAML file (a bounded read; its `experiment` table when it has
    one); a file that does not parse, or holds no table, is one line naming it."""
    text = read_text(path)
    yaml_file = path.endswith((".yaml", ".yml"))
    try:
        data = _parse_yaml(text) if yaml_file else _parse_toml(text)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply for an experiment file") from None
    except ValueError as e:  # the YAML and TOML parsers' errors, multi-line
        raise ValueError(f"{path} is not valid {'YAML' if yaml_file else 'TOML'} ({' '.join(str(e).split())})") from None
    if isinstance(data, dict):
        data = data.get("experiment", data)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level (or under `experiment`), "
                         f"got a {type(data).__name__}")
    return data


def _parse_yaml(text: str):
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


def _parse_toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)  # its TOMLDecodeError is a ValueError


def check_settings(settings: dict, where: str) -> None:
    """Each setting against the type of its ExperimentConfig field (an error names `where` and the key)."""
    hints = typing.get_type_hints(ExperimentConfig)
    for key in settings:
        hint = hints[key]
        optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
        kinds = tuple(typing.get_origin(h) or h for h in (typing.get_args(hint) if optional else (hint,))
                      if h is not type(None))
        value = check_field(settings, key, kinds, where, "see `poelm experiment --help` for each setting",
                            required=not optional)
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: field {key!r} must be a list of strings, e.g. [bp, poe]")


