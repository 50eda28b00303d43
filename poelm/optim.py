"""
MuonAdamW: the one optimizer of poelm, for a single process and for torch.distributed.

Param groups carry `kind`:
- "adamw": lr, betas, eps, weight_decay. Decoupled, bias-corrected AdamW; matches
  torch.optim.AdamW step for step.
- "muon":  lr, momentum, weight_decay (+ beta2=0.9, ns_steps=5). All params of a group share
  one shape (m, n) so they are stacked (K, m, n) and updated together: Nesterov momentum,
  row equilibration, Polar Express orthogonalisation, rescale to ||g||_F = sqrt(min(m, n)),
  NorMuon variance normalisation, cautious weight decay, lr * max(1, m/n)**0.5.
  The orthogonalisation runs in bf16 on CUDA (tensor cores) and in fp32 on CPU (these CPUs
  have no fast bf16; fp64 params stay fp64, which the equivalence tests use).

Usage:
    lrs = effective_hparams(model.config, total_batch_size, tc)   # docs/training.md "Scaling rules"
    print(lrs.line())
    opt = build_optimizer(model, lrs)            # groups by parameter name, docs/training.md
    for step in range(n):
        apply_schedules(opt, step, n)            # poelm.schedule: lr / momentum / wd
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

Distributed (torch.distributed initialised, world > 1): do NOT wrap the model in DDP. Every
rank backprops the mean loss of its own micro-batch and step() averages the gradients
itself: each stacked Muon group is reduce-scattered over its first dim (K padded up to a
multiple of the world size), each AdamW param over its flattened elements; every rank
updates only its shard and holds optimizer state only for that shard (ZeRO-2 style); the
updated shards are all-gathered back into the full params. So state_dict() is per rank:
save one file per rank and reload it with the same world size. A single process does no
communication at all.

Collectives: torch 2.13 gloo supports reduce_scatter_tensor/all_gather_into_tensor (and
NCCL always did). Older gloo builds lack reduce-scatter, so the first distributed step
probes the backend once; without it (or with `opt.collectives = "all_reduce"`) every
collective is emulated with all_reduce: the full buffer is summed everywhere and each rank
slices its shard; gathers are all_reduces of zero-padded shards. Results are identical,
only traffic differs. Averaging is SUM then divide by the world size (ReduceOp.AVG is not
on every backend). Params with no gradient are skipped (AdamW) or treated as a zero
gradient (inside a Muon stack); that must be the same on all ranks.

Per group (stage-parallel training, poelm.stage_parallel): a param group may name a `comm`,
a key of `MuonAdamW(groups, comms={name: Comm(process_group, divisor)})`; its gradients are
then summed over that process group only, divided by `divisor` (default: the group's size),
and its state is sharded over that group. Groups without one use every rank.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

# Polar Express (a, b, c) per iteration, docs/training.md
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

# AdamW groups: name -> betas, weight decay (the LR of each is a field of EffectiveLRs)
ADAMW_BETAS = {
    "lm_head": (0.8, 0.96), "wte": (0.8, 0.995), "value_embeds": (0.8, 0.995),
    "resid_lambdas": (0.8, 0.95), "x0_lambdas": (0.96, 0.95), "scalars": (0.8, 0.95),
}
ADAMW_WD = {
    "lm_head": 0.01, "wte": 0.001, "value_embeds": 0.01,
    "resid_lambdas": 0.05, "x0_lambdas": 0.0, "scalars": 0.0,
}
SCALARS_LR = 0.2  # smear_gate, smear_lambda, backout_lambda
B_REF = 2 ** 19  # tokens per step at which the LR flags were tuned (nanochat d12)
REF_DEPTH, REF_WIDTH = 12, 768  # the reference model of the scaling rules
LR_SCALING = ("nanochat", "off")

# -----------------------------------------------------------------------------
# Muon pieces (all act on stacks (K, m, n))

def nesterov_(buf: Tensor, g: Tensor, momentum: float) -> Tensor:
    """Update the momentum buffer in place and return the Nesterov direction."""
    buf.lerp_(g, 1 - momentum)
    return g.lerp(buf, momentum)


def equilibrate_rows(g: Tensor) -> Tensor:
    """Scale every row of each (m, n) matrix to the RMS of its row norms, ||X||_F / sqrt(m),
    which keeps ||X||_F (row norms clamped at 1e-6)."""
    row = g.norm(dim=-1, keepdim=True)                  # (K, m, 1)
    rms = row.square().mean(dim=-2, keepdim=True).sqrt()  # (K, 1, 1) = ||X||_F / sqrt(m)
    return g * (rms / row.clamp_min(1e-6))


def polar_express(g: Tensor, steps: int = 5) -> Tensor:
    """Approximate the orthogonal polar factor of each (m, n) matrix of g (..., m, n).
    Runs in bf16 on CUDA, in fp32 elsewhere (fp64 stays fp64); returns g's dtype."""
    x = g.to(torch.bfloat16 if g.is_cuda else torch.promote_types(g.dtype, torch.float32))
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = g.size(-2) > g.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if tall:
            A = x.mT @ x                                # (K, n, n)
            x = a * x + x @ (b * A + c * (A @ A))
        else:
            A = x @ x.mT                                # (K, m, m)
            x = a * x + (b * A + c * (A @ A)) @ x
    return x.to(g.dtype)


def set_fro_norm(g: Tensor, norm: Tensor | float) -> Tensor:
    """Rescale each (m, n) matrix to Frobenius norm `norm`."""
    return g * (norm / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def normuon_(g: Tensor, v: Tensor, beta2: float) -> Tensor:
    """NorMuon: one second moment per index of the longer dim (v is (K, m, 1) when m >= n,
    else (K, 1, n)), g *= rsqrt(v), then restore each matrix's Frobenius norm."""
    norm = g.norm(dim=(-2, -1), keepdim=True)
    reduce_dim = -1 if v.size(-1) == 1 else -2
    v.lerp_(g.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    return set_fro_norm(g * v.clamp_min(1e-10).rsqrt(), norm)


def cautious_step_(p: Tensor, g: Tensor, lr: float, wd: float) -> None:
    """p -= lr*g + lr*wd*p*mask, decaying only where the update agrees with p (g*p >= 0)."""
    mask = (g * p) >= 0
    p.sub_(lr * g + (lr * wd) * p * mask)


def muon_direction(g: Tensor, buf: Tensor, v: Tensor, momentum: float, beta2: float,
                   ns_steps: int = 5) -> Tensor:
    """Gradient stack (K, m, n) -> Muon update (before lr), advancing buf and v in place."""
    m, n = g.shape[-2:]
    g = nesterov_(buf, g, momentum)
    g = equilibrate_rows(g)
    g = set_fro_norm(polar_express(g, ns_steps), math.sqrt(min(m, n)))
    return normuon_(g, v, beta2)

# -----------------------------------------------------------------------------
# AdamW (the single-tensor torch.optim.AdamW recipe, on flat tensors)

def adamw_step_(p: Tensor, g: Tensor, state: dict, lr: float, betas: tuple[float, float],
                eps: float, wd: float) -> None:
    beta1, beta2 = betas
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))

# -----------------------------------------------------------------------------
# Collectives: each returns a `wait()` callable so communication overlaps compute

def dist_info() -> tuple[int, int]:
    """(world_size, rank); (1, 0) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Comm:
    """Where a param group's gradients are reduced: summed over `group` (None: every rank),
    then divided by `divisor` (None: the group's size, i.e. the mean)."""
    group: object = None
    divisor: int | None = None

    def info(self) -> tuple[int, int, int]:
        """(size, this rank's index in the group, divisor); (1, 0, 1) without torch.distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1, 0, 1
        size = dist.get_world_size(self.group)
        return size, dist.get_rank(self.group), self.divisor or size


def reduce_scatter_mean(full: Tensor, world: int, rank: int, use_rs: bool, group=None,
                        divisor: int | None = None) -> Callable[[], Tensor]:
    """Start averaging full (world*c, ...) over the ranks of `group` (sum / divisor, default
    world); wait() gives this rank's rows (c, ...)."""
    c = full.size(0) // world
    if use_rs:
        out = full.new_empty(c, *full.shape[1:])
        work = _reduce_scatter(out, full, group=group, async_op=True)
    else:
        full = full.clone()                              # never sum into the caller's grads
        out = full[rank * c:(rank + 1) * c]
        work = dist.all_reduce(full, group=group, async_op=True)

    def wait() -> Tensor:
        work.wait()                                      # (the Work object keeps `full` alive)
        return out.div_(divisor or world)
    return wait


def all_gather(shard: Tensor, world: int, rank: int, use_rs: bool, group=None) -> Callable[[], Tensor]:
    """Start gathering the shards (c, ...) of every rank of `group`; wait() gives (world*c, ...)."""
    c = shard.size(0)
    if use_rs:
        out = shard.new_empty(world * c, *shard.shape[1:])
        work = _all_gather(out, shard, group=group, async_op=True)
    else:
        out = shard.new_zeros(world * c, *shard.shape[1:])
        out[rank * c:(rank + 1) * c] = shard
        work = dist.all_reduce(out, group=group, async_op=True)

    def wait() -> Tensor:
        work.wait()
        return out
    return wait


def probe_collectives(device: torch.device) -> str:
    """'reduce_scatter' if the backend has reduce-scatter and all-gather into one tensor,
    else 'all_reduce'. Collective: every rank must call it."""
    world, rank = dist_info()
    x = torch.ones(world, device=device)
    try:
        reduce_scatter_mean(x, world, rank, True)()
        all_gather(x[:1], world, rank, True)()
        return "reduce_scatter"
    except (RuntimeError, NotImplementedError):
        return "all_reduce"


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """Zero-pad x along dim 0 to `rows` rows."""
    if x.size(0) == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.size(0), *x.shape[1:])])

# -----------------------------------------------------------------------------

class MuonAdamW(torch.optim.Optimizer):
    """Muon for stacked matrix groups, AdamW for the rest; sharded when distributed."""

    # "auto": probe once, then "reduce_scatter" (reduce-scatter + all-gather) or "all_reduce"
    collectives: str = "auto"

    def __init__(self, param_groups: list[dict], comms: dict[str, Comm] | None = None):
        super().__init__(param_groups, defaults={})
        self.comms = comms or {}  # group["comm"] -> Comm (not state: rebuilt by whoever builds the optimizer)
        for group in self.param_groups:
            assert group["kind"] in ("adamw", "muon"), group["kind"]
            if group["kind"] == "muon":
                shapes = {p.shape for p in group["params"]}
                assert len(shapes) == 1 and len(next(iter(shapes))) == 2, f"muon group shapes {shapes}"
                group.setdefault("beta2", 0.9)
                group.setdefault("ns_steps", 5)
            else:
                group.setdefault("eps", 1e-10)

    # -- one group: start the gradient reduction, returning a function that does the rest

    def _muon_begin(self, group: dict, comm: Comm, use_rs: bool):
        params = group["params"]
        if all(p.grad is None for p in params):
            return None
        g = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])  # (K, m, n)
        world, rank, divisor = comm.info()
        K = len(params)
        c = -(-K // world)                               # shard rows per rank
        lo, n_real = rank * c, max(0, min(c, K - rank * c))
        wait_g = (lambda: g) if world == 1 else reduce_scatter_mean(pad_rows(g, c * world), world, rank, use_rs,
                                                                    comm.group, divisor)

        def finish():
            grad = wait_g()[:n_real]                     # (n_real, m, n)
            local = params[lo:lo + n_real]
            if n_real > 0:
                p = torch.stack(local)
                self._muon_update(group, p, grad)
            if world == 1:
                return lambda: [q.copy_(x) for q, x in zip(local, p)]
            shard = pad_rows(p if n_real > 0 else g.new_zeros(0, *g.shape[1:]), c)
            wait_p = all_gather(shard, world, rank, use_rs, comm.group)
            return lambda: [q.copy_(x) for q, x in zip(params, wait_p())]
        return finish

    def _muon_update(self, group: dict, p: Tensor, g: Tensor) -> None:
        """p, g: (k, m, n) stacks of this rank's shard; state lives on the group's first param."""
        k, m, n = p.shape
        state = self.state[group["params"][0]]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(g)
            state["second_momentum"] = g.new_zeros((k, m, 1) if m >= n else (k, 1, n))
        assert state["momentum_buffer"].shape == g.shape, "muon state shard does not match (world size changed?)"
        u = muon_direction(g, state["momentum_buffer"], state["second_momentum"],
                           group["momentum"], group["beta2"], group["ns_steps"])
        lr = group["lr"] * max(1.0, m / n) ** 0.5
        cautious_step_(p, u, lr, group["weight_decay"])

    def _adamw_begin(self, p: Tensor, group: dict, comm: Comm, use_rs: bool):
        if p.grad is None:
            return None
        world, rank, divisor = comm.info()
        numel = p.numel()
        c = -(-numel // world)
        lo, hi = min(rank * c, numel), min(rank * c + c, numel)
        g = p.grad.reshape(-1)
        wait_g = (lambda: g) if world == 1 else reduce_scatter_mean(pad_rows(g, c * world), world, rank, use_rs,
                                                                    comm.group, divisor)

        def finish():
            flat = p.view(-1)                            # update the local slice in place
            state = self.state[p]
            if state:
                assert state["exp_avg"].numel() == hi - lo, "adamw state shard does not match (world size changed?)"
            if hi > lo:
                adamw_step_(flat[lo:hi], wait_g()[:hi - lo], state, group["lr"], group["betas"],
                            group["eps"], group["weight_decay"])
            else:
                wait_g()
            if world == 1:
                return lambda: None
            wait_p = all_gather(pad_rows(flat[lo:hi].clone(), c), world, rank, use_rs, comm.group)
            return lambda: flat.copy_(wait_p()[:numel])
        return finish

    # -- the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world, _ = dist_info()
        if world > 1 and self.collectives == "auto":
            self.collectives = probe_collectives(self.param_groups[0]["params"][0].device)
        use_rs = self.collectives != "all_reduce"
        finishers = self._begin_all(use_rs)              # gradient reductions in flight
        gathers = [f() for f in finishers]               # update shards, start all-gathers
        for done in gathers:
            done()                                       # copy gathered params back
        return loss

    def _begin_all(self, use_rs: bool) -> list:
        out = []
        for group in self.param_groups:
            comm = self.comms[group["comm"]] if "comm" in group else Comm()
            if group["kind"] == "muon":
                out.append(self._muon_begin(group, comm, use_rs))
            else:
                out.extend(self._adamw_begin(p, group, comm, use_rs) for p in group["params"])
        return [f for f in out if f is not None]

# -----------------------------------------------------------------------------

def adamw_group_of(name: str) -> str | None:
    """Which AdamW group (docs/training.md table) a parameter name belongs to, if any."""
    if name in ("lm_head.weight", "lm_head_stage.weight") or name.startswith("lm_head_stages."):
        return "lm_head"
    if name == "transformer.wte.weight":
        return "wte"
    if name.startswith("value_embeds."):
        return "value_embeds"
    if name in ("resid_lambdas", "x0_lambdas"):
        return name
    if name in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
        return "scalars"
    return None


@dataclass(frozen=True)
class EffectiveLRs:
    """What each optimizer group really gets: the AdamW LRs, the Muon base lr (each shape
    then x max(1, m/n)**0.5) and the Muon weight decay start (then the cosine schedule).
    The defaults are the flag values taken literally (d12 at 2^19 tokens per step)."""

    lm_head: float = 0.008
    wte: float = 0.3
    value_embeds: float = 0.15
    resid_lambdas: float = 0.005
    x0_lambdas: float = 0.5
    scalars: float = SCALARS_LR
    matrix: float = 0.02
    muon_weight_decay: float = 0.28
    scaling: str = "off"

    def line(self) -> str:
        return (f"effective lr ({self.scaling}): lm_head {self.lm_head:.4g} | wte {self.wte:.4g} | "
                f"value_embeds {self.value_embeds:.4g} | resid_lambdas {self.resid_lambdas:.4g} | "
                f"x0_lambdas {self.x0_lambdas:.4g} | smear/backout {self.scalars:.4g} | muon {self.matrix:.4g} "
                f"(x max(1, m/n)^0.5) | muon wd start {self.muon_weight_decay:.4g}")


def scaling_params(config) -> int:
    """Transformer matrices + lm_head of a GPTConfig (not embeddings, value embeddings,
    scalars or stage heads), counted on the meta device."""
    from poelm.model import GPT

    with torch.device("meta"):
        return GPT(config).matmul_params()


def reference_config(config):
    """The d12 model of the scaling rules: same vocab, aspect ratio (n_embd / n_layer) and
    head_dim as `config`, otherwise the defaults (MHA, 4x MLP)."""
    from poelm.model import GPTConfig

    hd = config.head_dim
    width = -(-REF_DEPTH * config.n_embd // (config.n_layer * hd)) * hd  # ceil to a multiple of head_dim
    return GPTConfig(n_layer=REF_DEPTH, n_embd=width, n_head=width // hd, head_dim=hd,
                     vocab_size=config.vocab_size, sequence_len=config.sequence_len, poe_mode="none")


def effective_hparams(config, total_batch_size: int, tc) -> EffectiveLRs:
    """docs/training.md "Scaling rules" (nanochat base_train). config: the GPTConfig; tc: a
    TrainConfig (unembedding_lr, embedding_lr, matrix_lr, scalar_lr, weight_decay, lr_scaling).
    nanochat: s_B = sqrt(B / 2^19) on all four LR flags, (n_embd/768)^-0.5 on lm_head, wte and
    value embeds, Muon wd = weight_decay * s_B * D_ref / D with D = ratio * scaling params
    (the ratio cancels). off: the flags and --weight-decay are taken literally."""
    for flag in ("unembedding_lr", "embedding_lr", "matrix_lr", "scalar_lr", "weight_decay"):
        v = getattr(tc, flag)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--{flag.replace('_', '-')} {v!r}: must be a finite number >= 0")
    if tc.lr_scaling not in LR_SCALING:
        raise ValueError(f"--lr-scaling {tc.lr_scaling!r}: choose {' or '.join(LR_SCALING)}")
    batch = width = decay = 1.0
    if tc.lr_scaling == "nanochat":
        batch = math.sqrt(total_batch_size / B_REF)
        width = (config.n_embd / REF_WIDTH) ** -0.5
        decay = batch * scaling_params(reference_config(config)) / scaling_params(config)
    head = tc.embedding_lr * batch * width
    return EffectiveLRs(lm_head=tc.unembedding_lr * batch * width, wte=head, value_embeds=0.5 * head,
                        resid_lambdas=0.01 * tc.scalar_lr * batch, x0_lambdas=tc.scalar_lr * batch,
                        scalars=SCALARS_LR, matrix=tc.matrix_lr * batch,
                        muon_weight_decay=tc.weight_decay * decay, scaling=tc.lr_scaling)


def build_optimizer(model: torch.nn.Module, lrs: EffectiveLRs = EffectiveLRs(), *, momentum: float = 0.85,
                    adam_eps: float = 1e-10) -> MuonAdamW:
    """Group the trainable params by name per docs/training.md and build MuonAdamW with the LRs
    of `lrs` as they are (scaling is effective_hparams' job). Muon: every 2-D matrix under
    transformer.h, one group per shape, lr=lrs.matrix, start weight decay
    lrs.muon_weight_decay. AdamW: the table. Frozen params (requires_grad=False) are left
    out. Each group gets `name`, `initial_lr` (and Muon `initial_weight_decay`) for the
    schedules."""
    adamw: dict[str, list] = {k: [] for k in ADAMW_BETAS}
    muon: dict[torch.Size, list] = {}                     # insertion order = model order
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("transformer.h.") and p.ndim == 2:
            muon.setdefault(p.shape, []).append(p)
        elif (key := adamw_group_of(name)) is not None:
            adamw[key].append(p)
        else:
            raise ValueError(f"parameter {name} {tuple(p.shape)} has no optimizer group")
    groups = [dict(kind="adamw", name=k, params=ps, lr=getattr(lrs, k), betas=ADAMW_BETAS[k],
                   eps=adam_eps, weight_decay=ADAMW_WD[k]) for k, ps in adamw.items() if ps]
    groups += [dict(kind="muon", name=f"muon{tuple(shape)}", params=ps, lr=lrs.matrix,
                    momentum=momentum, weight_decay=lrs.muon_weight_decay, beta2=0.9, ns_steps=5)
               for shape, ps in muon.items()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable), "a parameter is in no group or in two"
    for g in groups:
        g["initial_lr"] = g["lr"]
        if g["kind"] == "muon":
            g["initial_weight_decay"] = g["weight_decay"]
    return MuonAdamW(groups)
