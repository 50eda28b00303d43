"""Stage-parallel PoE training: each rank trains one stage; only forward activations cross.

    torchrun --nproc_per_node 4 -m poelm train --stage-parallel --poe-mode flat --poe-every 6 ...  # K=4, R=1
    torchrun --nnodes 2 --nproc_per_node 4 ... -m poelm train --stage-parallel ...                # K=4, R=2

With `flat` PoE (docs/poe.md section 1) the residual is detached at every stage boundary, so no
gradient crosses a boundary through it. The world of K x R ranks is a 2-D mesh: rank
r*K + k is stage k of data-parallel replica r (a replica's K stages are consecutive ranks,
so with --nproc_per_node K the pipeline stays inside one node). Rank (k, r) holds:
- its own: stage k's blocks, the value embeddings of its layers, its per-stage head;
  gradients averaged over the R replicas of stage k (the "stage group");
- replicas of what every stage shares: wte and the smear (x0 = embed(tokens) is not
  detached, every stage backprops into it), lm_head, and the (n_layer,) vectors
  resid_lambdas / x0_lambdas (each stage's gradient is non-zero only at its own layers);
  gradients summed over the K stages and averaged over the R replicas (all ranks).
The other stages' tensors stay on the meta device (no memory). MuonAdamW shards each
group's state over that group's ranks.

One step (grad_accum micro-batches): every rank draws replica r's micro-batch and embeds it
itself; stage k > 0 receives the detached boundary residual (B, T, d) of stage k-1 from rank
(k-1, r), runs its layers and its readout loss, sends its own boundary residual on to
(k+1, r) *before* its backward, then backprops. Sends are asynchronous, so stage k works on
micro-batch i+1 while stage k+1 works on i; the idle share of a step is ~ (K-1)/(grad_accum
+ K-1) for stages of equal cost (fill and drain). Then the optimizer step reduces the
gradients. The arithmetic is that of the one-process `flat` run on the same global batch:
only the order in which the shared tensors' gradient contributions are summed differs.

Evaluation, samples and checkpoints use `full_model()`: the complete GPT, assembled on every
rank by broadcasting each stage's tensors from its replica-0 rank (a temporary full copy).
A checkpoint is an ordinary model directory (model.safetensors of the whole model, written
by rank 0) plus one optimizer/loader shard per rank, i.e. per (stage, replica).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from poelm.model import GPT, GPTConfig, rmsnorm, softcap_cross_entropy
from poelm.optim import Comm, MuonAdamW
from poelm.runtime import SettingError

WHY_NOT = {  # poe_mode -> why it cannot train stage-parallel
    "none": "backprop sends gradients back through every stage boundary",
    "hier": "deep supervision does not detach the residual, so gradients cross stage boundaries",
    "residual_logop": "each stage's loss also reads every earlier stage's logits, which would have to be sent on",
}


# -----------------------------------------------------------------------------
# The mesh


@dataclass(frozen=True)
class Mesh:
    """K stages x R data-parallel replicas; rank = replica * K + stage."""
    stages: int
    replicas: int
    rank: int

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage


def check_mesh(config: GPTConfig, world: int, *, task=None, compile: bool = False) -> None:
    """Refuse what stage-parallel training cannot do, with one line each; `task` (a
    poelm.train.Task, None: pretraining) says whether it can be trained so."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SettingError("stage_parallel", "{stage_parallel} runs one process per stage: launch it with torchrun, "
                           "e.g. `{example}` (world = {k} stages x replicas)", k=config.n_stages,
                           example=f"torchrun --nproc_per_node {config.n_stages} -m poelm train --stage-parallel ...")
    if config.poe_mode != "flat":
        raise SettingError("stage_parallel", "{stage_parallel} trains {poe_mode} flat only: with {mode}, {why}",
                           mode=config.poe_mode, why=WHY_NOT[config.poe_mode])
    if task is not None and not task.stage_parallel:
        raise SettingError("stage_parallel", "{stage_parallel} trains pretraining runs; task {task} is not supported",
                           task=task.name)
    if compile:
        raise SettingError("compile", "{compile} is not supported with {stage_parallel} (each rank runs its layers "
                           "eagerly)")
    if world % config.n_stages:
        raise SettingError("stage_parallel", "{stage_parallel}: the world of {world} process(es) is not a multiple of "
                           "the {k} stages {layers}; launch K x R processes (e.g. --nproc_per_node {k})", world=world,
                           k=config.n_stages, layers=list(config.poe_stage_layers))


def make_mesh(config: GPTConfig, rank: int, world: int) -> Mesh:
    return Mesh(config.n_stages, world // config.n_stages, rank)


def balance_line(config: GPTConfig) -> str:
    """How the work is spread: one stage per rank, as the config cuts the layers."""
    layers = list(config.poe_stage_layers)
    line = f"stage-parallel: {len(layers)} stages of {layers} layers, one per rank"
    if len(set(layers)) > 1:
        idle = 1 - sum(layers) / (len(layers) * max(layers))
        line += (f"; stages of different sizes are not rebalanced: the pipeline runs at the pace of the "
                 f"{max(layers)}-layer stage (~{100 * idle:.0f}% of the block compute idles; cut equal "
                 f"stages with --poe-every)")
    return line


# -----------------------------------------------------------------------------
# Ownership


def owner_stage(name: str, config: GPTConfig) -> int | None:
    """The stage that owns a parameter, or None for what every stage shares."""
    ends = config.stage_ends
    stage_of = lambda layer: next(k for k, e in enumerate(ends) if layer <= e)  # noqa: E731
    parts = name.split(".")
    if name.startswith("transformer.h."):
        return stage_of(int(parts[2]))
    if name.startswith("value_embeds."):
        return stage_of(int(parts[1]))
    if name.startswith("lm_head_stages."):
        return int(parts[1])
    return None


def prune(model: GPT, stage: int) -> None:
    """Move every other stage's tensors to the meta device and freeze them (in place)."""
    foreign = [block for i, block in enumerate(model.transformer.h) if model.stage_of_layer(i) != stage]
    foreign += [emb for i, emb in model.value_embeds.items() if model.stage_of_layer(int(i)) != stage]
    if model.config.per_stage_head:
        foreign += [head for j, head in enumerate(model.lm_head_stages) if j != stage]
    for module in foreign:
        module.to("meta").requires_grad_(False)


# -----------------------------------------------------------------------------
# The stage's trainer


class StageParallel:
    """One rank's view of a stage-parallel run: its pruned model, its process groups, the
    pipelined micro-batch loop and the assembly of the full model."""

    def __init__(self, model: GPT, mesh: Mesh):
        self.model, self.mesh = model, mesh
        cfg = model.config
        self.first = 0 if mesh.stage == 0 else cfg.stage_ends[mesh.stage - 1] + 1
        self.end = cfg.stage_ends[mesh.stage] + 1  # layers [first, end)
        self.stage_group = None
        for k in range(mesh.stages):  # every rank creates every group, in the same order
            group = dist.new_group([mesh.rank_of(k, r) for r in range(mesh.replicas)])
            if k == mesh.stage:
                self.stage_group = group
        prune(model, mesh.stage)
        self.stats = {"wait_s": 0.0, "bytes_p2p": 0}
        self._full: tuple[int, GPT] | None = None

    # --- optimizer ------------------------------------------------------------
    def optimizer(self, built: MuonAdamW) -> MuonAdamW:
        """`built` (poelm.optim.build_optimizer of the pruned model) with every group split
        into what this stage owns (reduced over its replicas) and what all stages share
        (summed over stages, averaged over replicas)."""
        owned = {id(p) for name, p in self.model.named_parameters() if owner_stage(name, self.model.config) is not None}
        groups = []
        for g in built.param_groups:
            for comm, suffix in (("shared", ""), ("stage", "/stage")):
                ps = [p for p in g["params"] if (id(p) in owned) == (comm == "stage")]
                if ps:
                    groups.append({**g, "params": ps, "name": g["name"] + suffix, "comm": comm})
        comms = {"shared": Comm(None, self.mesh.replicas), "stage": Comm(self.stage_group)}
        return MuonAdamW(groups, comms)

    def collective_bytes(self, optimizer: MuonAdamW) -> int:
        """Bytes this rank sends per step in the optimizer's reduce-scatters and all-gathers
        (ring estimate: 2 x (n-1)/n of each group's gradient)."""
        total = 0
        for g in optimizer.param_groups:
            n = self.mesh.stages * self.mesh.replicas if g["comm"] == "shared" else self.mesh.replicas
            size = sum(p.numel() * p.element_size() for p in g["params"])
            total += int(2 * (n - 1) / n * size)
        return total

    # --- one step's micro-batches -----------------------------------------------
    def accumulate(self, loader, grad_accum: int, autocast_dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
        """Forward + backward of grad_accum micro-batches through this stage, pipelined.
        Returns (loss, stage losses (K,)) of the step, the same on every rank."""
        model, mesh, cfg = self.model, self.mesh, self.model.config
        k, K = mesh.stage, mesh.stages
        prev = mesh.rank_of(k - 1, mesh.replica) if k > 0 else None
        nxt = mesh.rank_of(k + 1, mesh.replica) if k < K - 1 else None
        scale = K ** (1 - cfg.poe_alpha)  # the loss is sum_k loss_k / K^(1 - alpha)
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        sends, own_loss = [], torch.zeros((), device=device)
        for _ in range(grad_accum):
            x, y = next(loader)  # (B, T): this replica's micro-batch, the same on all its stages
            boundary = recv = None
            if prev is not None:  # post the receive first: embed runs while it arrives
                boundary = torch.empty(*x.shape, cfg.n_embd, device=device, dtype=dtype)
                recv = dist.irecv(boundary, src=prev)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                x0 = model.embed(x)  # (B, T, d), not detached: wte and the smear train from every stage
                if recv is not None:
                    t0 = self._clock()
                    recv.wait()
                    self.stats["wait_s"] += self._clock() - t0
                h, _ = model.run_layers(x0 if boundary is None else boundary, x0, x, self.first, self.end)
                if nxt is not None:  # on before our own backward
                    out = h.detach().to(dtype).contiguous()
                    sends.append((dist.isend(out, dst=nxt), out))
                    self.stats["bytes_p2p"] += out.numel() * out.element_size()
                loss = self.stage_nll(h, y)
            (loss / scale / grad_accum).backward()
            own_loss += loss.detach().float() / grad_accum
        t0 = self._clock()
        for work, _ in sends:
            work.wait()
        losses = torch.zeros(K, device=device)
        losses[k] = own_loss
        dist.all_reduce(losses)  # also where the step waits for the slowest stage to drain
        self.stats["wait_s"] += self._clock() - t0
        losses /= mesh.replicas
        return float(losses.sum() / scale), losses

    def stage_nll(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token NLL of this stage's readout of its boundary residual h (B, T, d), as GPT._loss."""
        tgt = targets.reshape(-1)
        count = (tgt >= 0).sum().clamp(min=1)
        normed = rmsnorm(h).reshape(-1, h.shape[-1])  # (B*T, d)
        cfg = self.model.config
        return softcap_cross_entropy(normed, self.model.stage_head_weight(self.mesh.stage), tgt, cfg.vocab_size) / count

    def _clock(self) -> float:
        if self.model.lm_head.weight.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_metrics(self, dt: float, optimizer: MuonAdamW) -> dict:
        """The pipeline figures of the last step over all ranks (a collective), then reset:
        idle fraction (time blocked on activations or on the other stages / step time, mean
        over ranks) and bytes each rank sent (p2p activations counted; collectives estimated)."""
        device = self.model.lm_head.weight.device
        mine = torch.tensor([self.stats["wait_s"] / dt, float(self.stats["bytes_p2p"])], device=device, dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        every = torch.stack(every).cpu()
        self.stats = {"wait_s": 0.0, "bytes_p2p": 0}
        return {"pipeline_idle": float(every[:, 0].mean()), "bytes_p2p_per_rank": int(every[:, 1].max()),
                "bytes_collective_per_rank": self.collective_bytes(optimizer)}

    # --- the whole model (evaluation, samples, checkpoints) ---------------------
    @torch.no_grad()
    def full_model(self, step: int) -> GPT:
        """The complete model on every rank (a collective; cached for the step)."""
        if self._full is not None and self._full[0] == step:
            return self._full[1]
        self._full = None
        ref = self.model.lm_head.weight
        with torch.device("meta"):
            full = GPT(self.model.config)
        full.to_empty(device=ref.device)
        full.to(ref.dtype)
        own = self.model.state_dict()
        for name, t in full.state_dict().items():
            if not own[name].is_meta:
                t.copy_(own[name])
            owner = owner_stage(name, self.model.config)
            if owner is not None:
                dist.broadcast(t, src=self.mesh.rank_of(owner, 0))
        full.train()
        self._full = (step, full)
        return full
