"""Supervised fine-tuning of a post-hoc specialist (docs/poe.md §7) through `poelm train`'s own
trainer: the same progress bar, metrics.jsonl, atomic checkpoints, exact resume and plots.

    poelm data chat --source recall --out data/recall
    poelm sft runs/poe --data data/recall --out runs/recall --layers 2 --num-iterations 200
    poelm sft runs/recall --resume ...                  # continue exactly

MODEL is a PoE base (N new layers are attached, `--layers`) or a specialist made by
`poelm specialist attach`. Only the specialist's tensors train (poelm.specialist); the loss
is on assistant tokens and <|assistant_end|> only (poelm.chat). Evaluation reports **bits per
assistant token** on the held-out conversations (not bits per byte: the released stage cards
report this) and the exact-match accuracy of greedy answers on held-out prompts, next to the
base model's; the run ends with the base's Δlogit (its predictions through the base head on
base-style input, which must be exactly 0).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from poelm.chat import ASSISTANT_END, TURN_SPECIALS, render_prompt
from poelm.chatdata import ChatLoader, chat_batches, list_shards, read_conversations
from poelm.flags import at_least, setting
from poelm.train import Task



@dataclass
class SftSettings:
    """SFT's own settings beside TrainConfig's, declared like them (poelm.flags.setting): `poelm
    sft`'s flags are generated from these fields and the run records them."""
    attach_layers: int = setting(2, "new layers attached to a base", flags=("--layers",), type=at_least(1))
    force: bool = setting(False, "attach to a BP base anyway (its stages were never trained to predict: "
                                 "docs/poe.md section 6)")
    row_len: int | None = setting(None, "tokens per conversation row", type=at_least(1), shown="the model's context")
    eval_prompts: int = setting(32, "held-out prompts scored by exact match of the greedy answer, 0 = off",
                                type=at_least(0))


@torch.no_grad()
def assistant_bits(model, batches) -> dict:
    """Bits per assistant token of the final readout: Σ nats over targets >= 0 / (ln 2 · count)."""
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        per_token = model.token_nats(inputs, targets)["final"]  # (B, T)
        counted = targets >= 0
        nats += (per_token.double() * counted).sum()
        count += counted.sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in (nats, count):
            torch.distributed.all_reduce(t)
    model.train(was_training)
    if count.item() == 0:
        raise ValueError("no assistant tokens in the held-out chat data")
    return {"assistant_bits": nats.item() / (math.log(2) * count.item()), "assistant_tokens": int(count.item())}


@torch.no_grad()
def exact_match(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96) -> dict:
    """Share of held-out conversations whose greedy answer equals the reference (stripped)."""
    from poelm.engine import Engine

    was_training = model.training
    engine = Engine(model, tokenizer)
    end = tokenizer.special_tokens[ASSISTANT_END]
    hits = 0
    for messages in conversations:
        prompt = render_prompt(tokenizer, messages[:-1])
        want = messages[-1]["content"].strip()
        budget = min(max_new_tokens, len(tokenizer.encode(want)) + 4)
        out = engine.generate(prompt, max_new_tokens=budget, stop_token_ids=[end])
        hits += out.text.strip() == want
    model.train(was_training)
    return {"exact_match": hits / max(1, len(conversations)), "exact_match_n": len(conversations)}


@dataclass
class ChatEvaluator:
    """The SFT evaluation `poelm train`'s loop calls (the counterpart of the bpb evaluation)."""
    data_dir: str
    tokenizer: object
    batch_size: int
    seq_len: int
    prompts: int  # held-out prompts for exact match (0: off)
    device: object = "cpu"
    base: dict | None = None  # the base model's scores on the same data, reported beside

    def held_out(self) -> list[list[dict]]:
        _, val_path = list_shards(self.data_dir)
        return [c for c in read_conversations(val_path) if c[-1].get("role") == "assistant"][:self.prompts]

    def __call__(self, model) -> dict:
        batches = chat_batches(self.data_dir, self.tokenizer, self.batch_size, self.seq_len, split="val",
                               device=self.device)
        result = assistant_bits(model, batches)
        if self.prompts > 0:
            result.update(exact_match(model, self.tokenizer, self.held_out()))
        if self.base is not None:
            result["base"] = self.base
        return result

    @staticmethod
    def line(step: int, r: dict) -> str:
        text = f"step {step:>6} | held-out bits per assistant token {r['assistant_bits']:.4f}"
        if "exact_match" in r:
            text += f" | exact match {100 * r['exact_match']:.1f}% of {r['exact_match_n']}"
        if r.get("base"):
            b = r["base"]
            text += f" (base: {b['assistant_bits']:.4f}" + (f", {100 * b['exact_match']:.1f}%)" if "exact_match" in b else ")")
        return text


# rows per step when the batch is derived from the chat set: an epoch of about this many steps,
# at most MAX_DERIVED_ROWS rows per step
DERIVED_STEPS_PER_EPOCH = 8
MAX_DERIVED_ROWS = 32


def base_batch_settings(spec: str) -> dict | None:
    """{"total_batch_size", "device_batch_size"} the base MODEL was trained with (its checkpoint's
    trainer.json keeps the run's settings); None when MODEL is not a training run's checkpoint."""
    from poelm.checkpoint import TRAINER_NAME, model_dir
    from poelm.jsonfile import read_json_object

    directory = model_dir(spec)
    if directory is None or not (directory / TRAINER_NAME).is_file():
        return None
    settings = read_json_object(directory / TRAINER_NAME, "the trainer state").get("train_config") or {}
    batch = {k: settings.get(k) for k in ("total_batch_size", "device_batch_size")}
    return batch if all(isinstance(v, int) and v > 0 for v in batch.values()) else None


def sft_batch(spec: str, data: str, row_len: int | None, world: int = 1, total: int | None = None,
              device_batch: int | None = None) -> tuple[int, int, str]:
    """(total_batch_size, device_batch_size, where they came from) of `poelm sft MODEL --data CHAT`:
    flags given win; the others follow the base run's batch (its tokens per step, in rows of
    this run's length, as nanochat's chat SFT inherits the pretraining batch), else the chat
    set's size (an epoch of about DERIVED_STEPS_PER_EPOCH steps, one accumulation step)."""
    from poelm.checkpoint import CONFIG_NAME, model_dir
    from poelm.codec import from_config_json
    from poelm.jsonfile import read_json_object

    if total is not None and device_batch is not None:
        return total, device_batch, "--total-batch-size and --device-batch-size"
    directory = model_dir(spec)
    if directory is None:
        raise ValueError(f"poelm sft needs MODEL as a directory (a run or model directory), got {spec!r}")
    context = from_config_json(read_json_object(directory / CONFIG_NAME, "the model config")).sequence_len
    seq_len = min(row_len or context, context)
    base = base_batch_settings(spec)
    if base is not None:
        rows = max(1, base["total_batch_size"] // (seq_len * world))
        per_pass = device_batch or min(base["device_batch_size"], rows)
        source = (f"the base run's {base['total_batch_size']:,} tokens per step in rows of {seq_len} tokens "
                  f"(device batch {base['device_batch_size']})")
    else:
        conversations = sum(len(read_conversations(p)) for p in list_shards(data)[0])
        rows = min(MAX_DERIVED_ROWS, max(1, conversations // DERIVED_STEPS_PER_EPOCH))
        per_pass = device_batch or rows
        source = f"the chat set's {conversations:,} conversations (about {DERIVED_STEPS_PER_EPOCH} steps per epoch)"
    rows = max(per_pass, rows // per_pass * per_pass)
    return total or rows * seq_len * world, per_pass, source


def sft_model(tc, sft: SftSettings, device) -> tuple[object, object, object | None, dict | None]:
    """(tokenizer, specialist to train, its base or None, its lineage) for `poelm sft MODEL`: a
    base gets sft.attach_layers new layers; a specialist made by `poelm specialist attach`
    trains as it is. The lineage (poelm.specialist) names the base for `save-delta`."""
    from poelm import specialist
    from poelm.checkpoint import load_model, resolve_run_dir

    if not tc.init:
        raise ValueError("poelm sft needs MODEL: a PoE base or a specialist made by `poelm specialist attach`")
    base, tokenizer = load_model(tc.init, device=device)
    if tokenizer is None:
        raise ValueError(f"{tc.init} has no tokenizer; SFT renders chats with the model's own tokenizer (and its "
                         "chat special tokens)")
    missing = [t for t in TURN_SPECIALS if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"{tc.init}'s tokenizer lacks the chat special tokens {', '.join(missing)}")
    if specialist.is_specialist(base.config):  # trained as it is; its base (for the scores) from its lineage
        model = base
        specialist.freeze(model)
        info = specialist.find_lineage(Path(tc.init), resolve_run_dir(Path(tc.init)))
        base = load_model(info["base"], device=device)[0] if info and Path(info["base"]).exists() and \
            not info.get("parent") else None
    else:
        info = specialist.lineage(tc.init, specialist.base_content_hash(base))
        model = specialist.attach(base, sft.attach_layers, force=sft.force)
    return tokenizer, model.train(), base, info


@torch.no_grad()
def base_logit_delta(model, base, tokenizer, data_dir: str, n: int = 8) -> float:
    """max |Δlogit| between the base and the specialist's base prefix + base head, on
    base-style input (<|bos|> + text of held-out user turns, no chat specials)."""
    from poelm.specialist import base_logits

    _, val_path = list_shards(data_dir)
    texts = [c[0]["content"] for c in read_conversations(val_path)[:n]]
    base.requires_grad_(False)  # as the specialist's frozen copy: CPU kernels may differ by a bit otherwise
    T = min(64, base.config.sequence_len)
    worst = 0.0
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text)][:T]
        idx = torch.tensor([ids], device=base.lm_head.weight.device)
        want, got = base.eval()(idx), base_logits(model.eval(), idx)
        worst = max(worst, (want - got).abs().max().item())
    return worst


class SftTask(Task):
    """`poelm sft`'s task for the trainer (poelm.train.train): a specialist on a frozen base,
    conversations as data, one epoch as the default horizon, bits per assistant token (beside
    the base's) as evaluation, the base's lineage beside the run and its Δlogit at the end."""
    name = "sft"
    data_hint = "chat data with `poelm data chat --out DIR`"

    def __init__(self, settings: SftSettings | None = None):
        self.settings = settings or SftSettings()
        self.model = self.base = self.lineage = None

    def start(self, tc, rt) -> tuple[object, object, int]:
        tokenizer, self.model, self.base, self.lineage = sft_model(tc, self.settings, rt.device)
        config = self.model.config
        return tokenizer, config, min(self.settings.row_len or config.sequence_len, config.sequence_len)

    def build(self, tc, rt, config):
        return self.model

    def horizon(self, tc, rt, model, tokenizer, seq_len: int, grad_accum: int) -> tuple[int, str]:
        conversations = len(self.loader(tc, rt, tokenizer, seq_len, rt.rank, rt.world, None).conversations)
        rows = tc.device_batch_size * rt.world * grad_accum
        epoch = -(-conversations // rows)
        per_step = f"{rows / conversations:.3g} epochs per step ({rows:,} conversations of {conversations:,})"
        if rows > conversations:
            warnings.warn(f"one step holds {rows / conversations:.3g} epochs of the {conversations:,} training "
                          f"conversations (each is seen several times per step); lower --total-batch-size to "
                          f"{conversations * seq_len:,} tokens or less")
        if tc.num_iterations > 0:
            return tc.num_iterations, f"horizon: {tc.num_iterations:,} steps (--num-iterations); {per_step}"
        return epoch, f"horizon: {epoch:,} steps = one epoch of {conversations:,} conversations; {per_step}"

    def loader(self, tc, rt, tokenizer, seq_len: int, rank: int, world: int, state: dict | None) -> ChatLoader:
        return ChatLoader(tc.data, tokenizer, tc.device_batch_size, seq_len, rank=rank, world_size=world,
                          seed=tc.seed, device=rt.device, state=state)

    def evaluator(self, tc, setup, rt) -> ChatEvaluator:
        evaluator = ChatEvaluator(tc.data, setup.tokenizer, tc.device_batch_size, setup.seq_len,
                                  self.settings.eval_prompts, rt.device)
        if self.base is not None and tc.eval_every > 0:
            evaluator.base = evaluator(self.base)  # the base's scores on the same data, once
        return evaluator

    def begin(self, out: Path) -> None:
        if self.lineage is not None:  # `poelm specialist save-delta RUN` finds the base here
            from poelm.specialist import write_lineage

            write_lineage(out, self.lineage)

    def finish(self, tc, model, tokenizer, say) -> dict:
        if self.base is None:
            return {}
        delta = base_logit_delta(model, self.base, tokenizer, tc.data)  # the base's predictions, exactly untouched
        say(f"base preservation: max |Δlogit| of the base prefix + base head = {delta:.4f}")
        return {"base_delta_logit": delta}
