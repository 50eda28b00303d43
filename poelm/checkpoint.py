"""Saving and loading models: the Hugging Face directory layout, nanochat checkpoint
directories, training runs, presets and hub ids — everything `MODEL` may name.

    from poelm.checkpoint import load_model, save_model
    model, tokenizer = load_model("runs/demo")        # a run, model dir, nanochat dir or preset
    save_model(model, "out/model", tokenizer)           # config.json + model.safetensors + tokenizer

A model directory (docs/formats.md) holds `config.json`, `model.safetensors` and the tokenizer
files; `poelm export` adds the remote code. Every write goes to a temporary name first and
is renamed into place, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from poelm.atomic import atomic_dir, atomic_path, atomic_write_json
from poelm.codec import from_nanochat_meta, read_config_file, to_config_json, to_nanochat_meta
from poelm.model import GPT, GPTConfig
from poelm.outputs import MODEL_KIND, MODEL_KINDS, foreign_content, mark_output

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
LATEST_NAME = "latest"  # a training run's pointer to its newest checkpoint directory
KEY_PREFIXES = ("_orig_mod.", "model.", "module.")


# -----------------------------------------------------------------------------
# Atomic file helpers


def atomic_torch_save(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_replaceable(out: str | Path, sources: tuple = (), overwrite: bool = False, flag: str = "--out",
                      kinds: tuple[str, ...] = MODEL_KINDS) -> None:
    """Refuse to replace `out` wholesale unless it is new, empty or a previous poelm output of
    one of `kinds` that nobody has changed since (its marker, poelm.outputs), or `overwrite`;
    never when it is a file, is/contains/lies inside a source, or contains the working or home
    directory (those are refused even with overwrite)."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"{flag} {out} is a file (or a link); remove it or choose a directory path")
    target = out.resolve()
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        s = Path(src).resolve()
        if target == s or s in target.parents or target in s.parents:
            rel = "is" if target == s else ("lies inside" if s in target.parents else "contains")
            raise ValueError(f"{flag} {out} {rel} the source {src}; write the output somewhere else")
    for name, protected in (("working directory", Path.cwd()), ("home directory", Path.home())):
        p = protected.resolve()
        if target == p or target in p.parents:
            raise ValueError(f"{flag} {out} is or contains the {name}; choose a new directory for the output")
    if not out.is_dir() or overwrite:
        return
    foreign = foreign_content(out, kinds)
    if foreign is not None:
        what = "model" if kinds == MODEL_KINDS else "/".join(kinds)
        raise ValueError(f"{flag} {out} exists and is not a poelm {what} directory ({foreign}); choose a new or empty "
                         "directory, or pass --overwrite to replace it and everything in it")


# -----------------------------------------------------------------------------
# State dicts


def normalize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip `_orig_mod.` / `model.` / `module.` prefixes (torch.compile, HF wrappers, DDP)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in KEY_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy a state dict into the model (casting dtypes); names every missing/unexpected key."""
    state = normalize_state_dict(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        raise ValueError(f"{source} does not match the model config ({'; '.join(parts)})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source} has tensors of the wrong shape for this config: {', '.join(wrong)}")
    check_finite(state, source)
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k].to(v.dtype))


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict holding a NaN or an infinity (it would load and generate garbage silently)."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{source}: tensor {name} holds NaN or infinite values; the weights are broken: "
                             "load an earlier checkpoint or a good copy of the file")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the model directory needs its weights ({WEIGHTS_NAME})")
    try:
        return load_file(str(path))
    except Exception as e:  # truncated or foreign files raise assorted errors
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); re-export or re-download it") from None


def write_safetensors(model: GPT, path: Path, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})


# -----------------------------------------------------------------------------
# Model directories


def save_model(model: GPT, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
               generation_config: dict | None = None, overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files, generation_config.json)
    and the output marker into a temporary directory, then move it onto out_dir in one rename.
    An existing out_dir must be a poelm model directory (see `check_replaceable`) unless `overwrite`."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite=overwrite)
    with atomic_dir(out_dir) as tmp:
        dtype_name = str(dtype or model.lm_head.weight.dtype).replace("torch.", "")
        atomic_write_json(tmp / CONFIG_NAME, to_config_json(model.config, dtype_name))
        write_safetensors(model, tmp / WEIGHTS_NAME, dtype)
        if tokenizer is not None:
            tokenizer.save(tmp)
        gen = {"bos_token_id": tokenizer.bos_token_id} if tokenizer is not None else {}
        old_gen = out_dir / GENERATION_CONFIG_NAME
        if old_gen.exists():  # keep calibration etc. stored with an earlier save
            gen = {**json.loads(old_gen.read_text()), **gen}
        gen.update(generation_config or {})
        if gen:
            atomic_write_json(tmp / GENERATION_CONFIG_NAME, gen)
        mark_output(tmp, MODEL_KIND)
    return out_dir


def load_model_dir(path: Path, device="cpu", dtype: torch.dtype = torch.float32) -> tuple[GPT, object]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: not a poelm/Hugging Face model directory")
    config = read_config_file(cfg_path)
    state = read_safetensors(path / WEIGHTS_NAME)
    model = build_model(config, device="meta")
    model.to_empty(device=device)
    model.to(dtype)
    load_state_into(model, state, source=str(path / WEIGHTS_NAME))
    tokenizer = load_tokenizer_if_any(path, config)
    return model.eval(), tokenizer


def load_tokenizer_if_any(path: Path, config: GPTConfig | None = None):
    """The tokenizer stored in a directory (or None); its vocab must match the model's."""
    has = any((path / n).exists() for n in ("tokenizer.json", "tokenizer.pkl"))
    if not has:
        return None
    from poelm.tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    if not (path / "token_bytes.pt").exists():
        warnings.warn(f"{path / 'token_bytes.pt'} is missing: token byte lengths (for bits per byte) are "
                      "recomputed from the tokenizer's vocabulary", stacklevel=2)
    if config is not None:
        check_tokenizer(tok, config, str(path))
    return tok


def check_tokenizer(tokenizer, config: GPTConfig, where: str = "tokenizer") -> None:
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{where}: tokenizer vocab {tokenizer.vocab_size} != model vocab {config.vocab_size}; "
                         "use the tokenizer the model was trained with")


def build_model(config: GPTConfig, device="cpu", init: bool = False) -> GPT:
    if device == "meta":
        with torch.device("meta"):
            return GPT(config)
    with torch.device(device):
        model = GPT(config)
    if init:
        model.init_weights()
    return model


# -----------------------------------------------------------------------------
# nanochat checkpoint directories


def _latest_step(directory: Path, pattern: str) -> int | None:
    steps = []
    for f in glob.glob(str(directory / pattern)):
        m = re.search(r"_(\d+)\.(pt|json)$", f)
        if m:
            steps.append(int(m.group(1)))
    return max(steps) if steps else None


def is_nanochat_dir(path: Path) -> bool:
    return path.is_dir() and _latest_step(path, "model_*.pt") is not None


def load_nanochat_dir(path: Path, device="cpu", dtype=torch.float32, step: int | None = None,
                      tokenizer_dir: str | Path | None = None, poe_mode: str | None = None) -> tuple[GPT, object]:
    step = step if step is not None else _latest_step(path, "model_*.pt")
    model_file, meta_file = path / f"model_{step:06d}.pt", path / f"meta_{step:06d}.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} is missing: a nanochat checkpoint needs its meta json beside the model file")
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file} is missing: pass a step that has a model file")
    try:
        config = from_nanochat_meta(json.loads(meta_file.read_text()), poe_mode)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file} is not valid JSON ({e})") from None
    except ValueError as e:
        raise ValueError(f"{meta_file}: {e}") from None
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # truncated zip, foreign or corrupt pickle
        raise ValueError(f"{model_file} is not a readable torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); re-download or re-save it") from None
    if not isinstance(state, dict):
        raise ValueError(f"{model_file} holds a {type(state).__name__}, not a state dict; re-save it with torch.save(model.state_dict())")
    model = build_model(config, device="meta")
    model.to_empty(device=device)
    model.to(dtype)
    load_state_into(model, state, source=str(model_file))
    tokenizer = None
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [path, path.parent / "tokenizer", path.parent.parent / "tokenizer"]
    for cand in candidates:
        tokenizer = load_tokenizer_if_any(cand, config) if cand.is_dir() else None
        if tokenizer is not None:
            break
    return model.eval(), tokenizer


def save_nanochat_dir(model: GPT, out_dir: str | Path, step: int, meta_extra: dict | None = None,
                      prefix: str = "") -> None:
    """Write the nanochat layout (model_{step}.pt + meta_{step}.json) with the fork's field names,
    plus poelm's own settings in model_config so a reload restores them; used by tests."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {prefix + k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out_dir / f"model_{step:06d}.pt")
    meta = {"step": step, **to_nanochat_meta(cfg)}
    meta.update(meta_extra or {})
    atomic_write_json(out_dir / f"meta_{step:06d}.json", meta)


# -----------------------------------------------------------------------------
# Anything MODEL may name


def resolve_run_dir(path: Path) -> Path | None:
    """The newest checkpoint directory of a `poelm train --out` run, or None."""
    pointer = path / LATEST_NAME
    if pointer.is_file():
        target = path / pointer.read_text().strip()
        if (target / CONFIG_NAME).exists():
            return target
    return None


def model_dir(spec: str) -> Path | None:
    """The directory that holds MODEL's config.json (a run dir resolves to its latest
    checkpoint); None for a preset, a hub id or a path that holds no model."""
    path = Path(spec)
    if not path.is_dir():
        return None
    path = resolve_run_dir(path) or path
    return path if (path / CONFIG_NAME).exists() or any(path.glob("model_*.pt")) else None


def looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not os.path.exists(name)


def download_from_hub(repo_id: str) -> Path:
    """Fetch a hub repo into the local cache (needs a network and huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{repo_id!r} looks like a hub id but huggingface_hub is not installed; "
                         "pip install huggingface_hub or pass a local directory") from None
    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:
        raise ValueError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}); offline? "
                         f"download it elsewhere with `hf download {repo_id} --local-dir DIR` "
                         "(older huggingface_hub: `huggingface-cli download`) and pass DIR") from None


def load_model(spec: str | Path, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
               tokenizer_dir: str | Path | None = None, **overrides) -> tuple[GPT, object]:
    """Load MODEL: a preset name (random init), a model directory, a nanochat checkpoint
    directory, the --out directory of `poelm train` (its latest checkpoint) or a hub id.
    Returns (model in eval mode, tokenizer or None). A specialist delta on it:
    poelm.specialist.load_with_delta."""
    from poelm.presets import PRESETS, get_preset

    name = str(spec)
    path = Path(name)
    if name in PRESETS and not path.exists():
        torch.manual_seed(seed)
        model = build_model(get_preset(name, **overrides), device=device, init=True).to(dtype).eval()
        tokenizer = load_tokenizer_if_any(Path(tokenizer_dir), model.config) if tokenizer_dir else None
        return model, tokenizer
    if not path.exists():
        if looks_like_hub_id(name):
            path = download_from_hub(name)
        else:
            raise FileNotFoundError(f"{name!r} is neither a preset ({', '.join(PRESETS)}), a directory nor a hub id")
    if path.is_dir():
        run = resolve_run_dir(path)
        if run is not None:
            path = run
        if (path / CONFIG_NAME).exists():
            model, tokenizer = load_model_dir(path, device, dtype)
        elif is_nanochat_dir(path):
            model, tokenizer = load_nanochat_dir(path, device, dtype, tokenizer_dir=tokenizer_dir)
        else:
            raise FileNotFoundError(f"{path} holds no config.json, no model_*.pt and no training run: nothing to load")
        if tokenizer_dir and tokenizer is None:
            tokenizer = load_tokenizer_if_any(Path(tokenizer_dir), model.config)
        return model, tokenizer
    raise ValueError(f"{path} is a file; pass the directory that holds it")
