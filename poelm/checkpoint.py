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
import os
import pickle
import re
import stat
import warnings
from pathlib import Path

import torch

from poelm.atomic import atomic_dir, atomic_path, atomic_write_json
from poelm.codec import from_nanochat_meta, read_config_json, to_config_json, to_nanochat_meta
from poelm.jsonfile import read_json_object
from poelm.memory import check_fits
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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # through a Python file, so a full disk raises OSError(ENOSPC), not an opaque RuntimeError


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
        try:
            save_file(state, tmp, metadata={"format": "pt"})
        except Exception as e:  # safetensors reports I/O errors as "... (os error N)": give them back their errno
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), tmp) from None


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
            gen = {**read_json_object(old_gen, "a generation config", "fix or delete it"), **gen}
        gen.update(generation_config or {})
        if gen:
            atomic_write_json(tmp / GENERATION_CONFIG_NAME, gen)
        mark_output(tmp, MODEL_KIND)
    return out_dir


def load_model_dir(path: Path, device="cpu", dtype: torch.dtype = torch.float32) -> tuple[GPT, object]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: not a poelm/Hugging Face model directory")
    config = read_config_json(cfg_path)
    check_fits(config, str(cfg_path), device)
    weights = path / WEIGHTS_NAME
    model = with_weights(build_model(config, device="meta"), lambda: read_safetensors(weights), device, dtype, str(weights))
    return model, load_tokenizer_if_any(path, config)


def on_meta(device: torch.device | str) -> bool:
    """Whether `device` is the meta device, where a load builds the model from its config alone."""
    return torch.device(device).type == "meta"


def with_weights(model: GPT, read_state, device, dtype: torch.dtype, source: str) -> GPT:
    """The meta-device `model` in dtype on `device`, in eval mode, holding the state dict that
    read_state() returns (read from `source`); on the meta device no weight is read: the model
    is its config alone (what a process that never runs it needs to check requests)."""
    model.to(dtype)
    if not on_meta(device):
        model.to_empty(device=device)
        load_state_into(model, read_state(), source=source)
    return model.eval()


def load_tokenizer_if_any(path: Path, config: GPTConfig | None = None):
    """The tokenizer stored in a directory (or None); its vocab must match the model's."""
    from poelm.tokenizer import TOKEN_BYTES_NAME, Tokenizer, has_tokenizer

    if not has_tokenizer(path):
        return None
    tok = Tokenizer.load(path)
    if not (path / TOKEN_BYTES_NAME).exists():
        warnings.warn(f"{path / TOKEN_BYTES_NAME} is missing: token byte lengths (for bits per byte) are "
                      "recomputed from the tokenizer's vocabulary", stacklevel=2)
    if config is not None:
        check_tokenizer(tok, config, str(path))
    return tok


def check_tokenizer(tokenizer, config: GPTConfig, where: str = "tokenizer") -> None:
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{where}: tokenizer vocab {tokenizer.vocab_size} != model vocab {config.vocab_size}; "
                         "use the tokenizer the model was trained with")


def build_model(config: GPTConfig, device="cpu", init: bool = False, source: str = "the model settings") -> GPT:
    """GPT(config) on device (refused first, naming `source`, when it cannot fit there)."""
    if device == "meta":
        with torch.device("meta"):
            return GPT(config)
    check_fits(config, source, device)
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
    meta = read_json_object(meta_file, "a nanochat meta file", "re-download or re-save the checkpoint")
    try:
        config = from_nanochat_meta(meta, poe_mode)
    except ValueError as e:
        raise ValueError(f"{meta_file}: {e}") from None
    check_fits(config, str(meta_file), device)
    model = with_weights(build_model(config, device="meta"), lambda: read_torch_state(model_file), device, dtype,
                         str(model_file))
    tokenizer = None
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [path, path.parent / "tokenizer", path.parent.parent / "tokenizer"]
    for cand in candidates:
        tokenizer = load_tokenizer_if_any(cand, config) if cand.is_dir() else None
        if tokenizer is not None:
            break
    return model, tokenizer


def read_torch_state(model_file: Path) -> dict:
    """The state dict of a nanochat model_*.pt (tensors only: nothing else is unpickled)."""
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # truncated zip, foreign or corrupt pickle
        raise ValueError(f"{model_file} is not a readable torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); re-download or re-save it") from None
    if not isinstance(state, dict):
        raise ValueError(f"{model_file} holds a {type(state).__name__}, not a state dict; re-save it with torch.save(model.state_dict())")
    return state


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
# Training runs: nothing in a run directory leads outside it


TRAINER_NAME = "trainer.json"  # written last into a step directory: its presence marks a complete checkpoint
STEP_NAME = re.compile(r"step_(\d{6,})")
SHARD_NAME = re.compile(r"optim_rank(\d+)\.pt")


def step_of(name: str) -> int | None:
    """The step of a `step_NNNNNN` name; None for anything else (paths included)."""
    m = STEP_NAME.fullmatch(name)
    return int(m[1]) if m else None


def read_run_file(path: Path, limit: int = 1 << 26) -> bytes:
    """A regular file of a run directory, read without following a link, at most `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        if os.path.islink(path):
            raise ValueError(f"{path} is a symbolic link; poelm never follows links inside a run directory: "
                             "replace it with the file itself") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file; replace it with the file poelm wrote")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit:,} bytes, which no poelm run file is; replace it")
    return data


def run_step_dirs(run: Path) -> list[Path]:
    """The run's step_NNNNNN directories (real directories, never links), oldest first."""
    try:
        with os.scandir(run) as entries:
            names = [e.name for e in entries if step_of(e.name) is not None and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    return [run / n for n in sorted(names, key=step_of)]


def is_complete_checkpoint(ckpt: Path) -> bool:
    """A real directory holding no links, with config, weights, trainer.json and the optimizer
    and loader shard of every rank that wrote it, all regular files."""
    try:
        if not stat.S_ISDIR(os.lstat(ckpt).st_mode):
            return False
        with os.scandir(ckpt) as entries:
            found = list(entries)
    except OSError:
        return False
    if any(e.is_symlink() for e in found):
        return False
    files = {e.name for e in found if e.is_file(follow_symlinks=False)}
    shards = sum(1 for n in files if SHARD_NAME.fullmatch(n))
    need = {CONFIG_NAME, WEIGHTS_NAME, TRAINER_NAME, *(f"optim_rank{r}.pt" for r in range(shards)),
            *(f"loader_rank{r}.json" for r in range(shards))}
    return need <= files


def _read_latest(run: Path) -> tuple[str | None, str | None]:
    """(the step directory name `latest` holds, None), (None, why it names none), or (None, None) without one."""
    pointer = run / LATEST_NAME
    if not os.path.lexists(pointer):
        return None, None
    try:
        text = read_run_file(pointer, limit=256).decode("utf-8", "replace").strip()
    except ValueError:
        return None, "`latest` is a symbolic link" if os.path.islink(pointer) else "`latest` is not a small file"
    except OSError as e:
        return None, f"`latest` cannot be read ({e.strerror})"
    if step_of(text) is None:
        return None, f"`latest` holds {text[:80]!r}, not the name of a step directory inside the run"
    return text, None


def run_checkpoint(run: Path) -> tuple[Path | None, str | None]:
    """The checkpoint of a training run that loads and resumes use: the step directory `latest`
    names when that is a complete checkpoint directly inside the run, else the newest complete
    one, returned with why `latest` was not used. (None, why or None) when the run has none."""
    name, why = _read_latest(run)
    if name is not None:
        if is_complete_checkpoint(run / name):
            return run / name, None
        why = f"`latest` names {name}, which is missing or incomplete"
    complete = [p for p in run_step_dirs(run) if is_complete_checkpoint(p)]
    if not complete:
        return None, why
    return complete[-1], why or "`latest` is missing"


def resolve_run_dir(path: Path) -> Path | None:
    """The checkpoint directory of a `poelm train --out` run (see `run_checkpoint`; a warning
    says when it is not the one `latest` names), or None when `path` holds none."""
    ckpt, why = run_checkpoint(path)
    if ckpt is not None and why is not None:  # (warned from this line: shown once, however many callers ask)
        warnings.warn(f"{path}: {why}; loading {ckpt.name}, the newest complete checkpoint")
    return ckpt


def load_run(path: Path, device="cpu", dtype: torch.dtype = torch.float32, tries: int = 5) -> tuple[GPT, object]:
    """The checkpoint of a training run. Pruning moves a checkpoint away whole, so a load whose
    directory is gone when it ends may have missed files: it is retried on the new newest."""
    for _ in range(tries):
        ckpt = resolve_run_dir(path)
        if ckpt is None:
            break
        try:
            loaded = load_model_dir(ckpt, device, dtype)
        except (OSError, ValueError):
            if ckpt.is_dir():
                raise
            continue
        if ckpt.is_dir():
            return loaded
    raise FileNotFoundError(f"{path} is a training run with no complete checkpoint now (it may be saving or pruning "
                            "one); wait for its next save and try again")


# -----------------------------------------------------------------------------
# Anything MODEL may name


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
    Returns (model in eval mode, tokenizer or None); on device "meta", the model built from its
    config alone (no weight is read). A specialist delta on it: poelm.specialist.load_with_delta."""
    from poelm.presets import PRESETS, get_preset

    name = str(spec)
    path = Path(name)
    if name in PRESETS and not path.exists():
        torch.manual_seed(seed)
        model = build_model(get_preset(name, **overrides), device=device, init=True, source=f"preset {name}")
        model = model.to(dtype).eval()
        tokenizer = load_tokenizer_if_any(Path(tokenizer_dir), model.config) if tokenizer_dir else None
        return model, tokenizer
    if not path.exists():
        if looks_like_hub_id(name):
            path = download_from_hub(name)
        else:
            raise FileNotFoundError(f"{name!r} is neither a preset ({', '.join(PRESETS)}), a directory nor a hub id")
    if path.is_dir():
        if run_checkpoint(path)[0] is not None:
            model, tokenizer = load_run(path, device, dtype)
        elif (path / CONFIG_NAME).exists():
            model, tokenizer = load_model_dir(path, device, dtype)
        elif is_nanochat_dir(path):
            model, tokenizer = load_nanochat_dir(path, device, dtype, tokenizer_dir=tokenizer_dir)
        elif run_step_dirs(path) or os.path.lexists(path / LATEST_NAME):
            raise FileNotFoundError(f"{path} is a training run with no complete checkpoint; wait for its first save "
                                    "(or resume the run) and load it then")
        else:
            raise FileNotFoundError(f"{path} holds no config.json, no model_*.pt and no training run: nothing to load")
        if tokenizer_dir and tokenizer is None:
            tokenizer = load_tokenizer_if_any(Path(tokenizer_dir), model.config)
        return model, tokenizer
    raise ValueError(f"{path} is a file; pass the directory that holds it")
