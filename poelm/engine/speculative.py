"""Self-speculative decoding, batched (docs/poe.md §5).

    dec = SpeculativeDecoder(model, DecodeOptions(mode="speculative", draft_stage=0, gamma=4), capacity)
    dec.add_rows(prompts); new = dec.step()          # {handle: [accepted drafts..., next token]}

Stage d drafts up to gamma tokens per row through layers <= d's boundary; one verify pass
runs only the deeper layers over [pending, drafts] of every row, reusing the draft K/V and
boundary residuals. Greedy: token-identical to plain greedy. Sampling: the Leviathan/Chen
rule (the output distribution equals the target's). Rows accept different numbers of drafts
and advance by different amounts (ragged slots); rejected slots are simply overwritten by
the row's next step. The cache holds `gamma + 1` scratch slots past the capacity so drafts
of one row never depend on another row's room.
"""

from __future__ import annotations

import torch

from poelm.engine.decoders import Capabilities, Decoder
from poelm.engine.options import MAX_GAMMA, DecodeOptions, ModeRefused, _check
from poelm.engine.sampling import Sampler
from poelm.model import GPT


class SpeculativeDecoder(Decoder):
    modes = {"speculative": Capabilities("speculative drafting from a stage", needs_stages=True)}

    @classmethod
    def check_options(cls, opts: DecodeOptions, model: GPT) -> None:
        cfg = model.config
        K = cfg.n_stages
        if K < 2:
            raise ModeRefused("speculative decoding needs a model with at least 2 stages")
        if cfg.final_readout != "last":
            raise ModeRefused("speculative decoding verifies with the last stage's readout; this model's final readout "
                              "is the Log-OP of all stages (final_readout=logop): use mode final, logop or wand")
        d = opts.draft_stage
        _check(isinstance(d, int) and 0 <= d < K - 1, f"draft stage {d!r} is out of range: use 0..{K - 2} (the last stage is the target)", "draft_stage")
        g = opts.gamma
        _check(isinstance(g, int) and 1 <= g <= MAX_GAMMA, f"gamma must be an integer in 1..{MAX_GAMMA}, got {g!r}", "gamma")
        th = opts.draft_threshold
        _check(th is None or (isinstance(th, (int, float)) and 0 <= th <= 1), f"draft_threshold must lie in [0, 1], got {th!r}", "draft_threshold")

    def __init__(self, model: GPT, opts: DecodeOptions, capacity: int):
        scratch = (MAX_GAMMA if opts.adaptive_gamma else opts.gamma) + 1
        super().__init__(model, opts, capacity, scratch)
        cfg = model.config
        self.end_layer = cfg.n_layer
        self.d = opts.draft_stage
        self.split = cfg.stage_ends[self.d] + 1
        self.bl = cfg.backout_layer if cfg.backout else -1
        self.stats.draft_stage, self.stats.stages_per_token, self.stats.gamma = self.d, cfg.n_stages, opts.gamma

    def _step(self) -> dict[int, list[int]]:
        model, opts, sampler = self.model, self.opts, self.sampler
        B, L, split, bl = len(self.rows), self.cfg.n_layer, self.split, self.bl
        mid_in_draft = 0 <= bl < split
        slot0 = [r.slots for r in self.rows]
        n_max = [max(0, min(r.gamma, self.capacity - r.slots - 1, opts.max_new_tokens - r.produced - 1))
                 for r in self.rows]
        proposed = [0] * B
        drafting = [n > 0 for n in n_max]
        draft_seen = self.seen.clone()
        arange = torch.arange(B, device=self.device)
        feed = self.pending()  # (B, 1)
        xs, x0s, mids, drafts, qs = [], [], [], [], []
        while True:  # draft: layers [0, split), one position per row at a time
            j = len(drafts)
            start = slot0[0] + j if all(s == slot0[0] for s in slot0) else [s + j for s in slot0]
            x = x0 = model.embed(feed, self.cache, start)
            x, kept = model.run_layers(x, x0, feed, 0, split, self.cache, start, keep={bl} if mid_in_draft else set())
            self.stats.layer_passes += split * B
            self.stats.layer_calls += split * B
            xs.append(x), x0s.append(x0), mids.append(kept.get(bl))
            if not any(drafting):
                break
            q_logits = sampler.penalise(model.readout(x[:, -1], self.d), draft_seen)  # (B, V)
            if opts.greedy:
                token, q = q_logits.argmax(-1), None
                top_prob = q_logits.softmax(-1).gather(1, token[:, None])[:, 0] if opts.draft_threshold else None
            else:
                q = sampler.probs(q_logits)
                token = sampler.draw(q)
                top_prob = q.max(-1).values
            low = (top_prob < opts.draft_threshold).tolist() if opts.draft_threshold is not None else [False] * B
            for b in range(B):
                if drafting[b]:
                    if low[b]:
                        drafting[b] = False
                    else:
                        proposed[b] += 1
                        drafting[b] = proposed[b] < n_max[b]
            if not any(p > j for p in proposed):  # no row proposed this draft: verify what there is
                break
            drafts.append(token), qs.append(q)
            draft_seen[arange, token] = True
            feed = token[:, None]
        n = len(drafts)
        # verify: layers [split, L) on [pending, drafts] of every row in one pass
        idx = torch.cat([self.pending()] + [t[:, None] for t in drafts], 1)  # (B, n+1)
        start = slot0[0] if all(s == slot0[0] for s in slot0) else slot0
        x, kept = model.run_layers(torch.cat(xs[:n + 1], 1), torch.cat(x0s[:n + 1], 1), idx, split, L, self.cache,
                                   start, keep={bl} if bl >= split else set())
        self.stats.layer_passes += (L - split) * (n + 1) * B
        self.stats.layer_calls += (L - split) * B
        x_mid = torch.cat(mids[:n + 1], 1) if mid_in_draft else kept.get(bl)
        p_logits = model.readout(x, None, x_mid)  # (B, n+1, V)
        if opts.repetition_penalty != 1.0:
            rows_seen = self.seen.unsqueeze(1).repeat(1, n + 1, 1)  # (B, n+1, V)
            for i, t in enumerate(drafts):
                rows_seen[:, i + 1:] |= torch.nn.functional.one_hot(t, rows_seen.shape[-1]).bool()[:, None]
            p_logits = sampler.penalise(p_logits, rows_seen)
        drafts_host = torch.stack(drafts, 1).tolist() if n else [[] for _ in range(B)]  # (B, n)
        out = {}
        for b, r in enumerate(self.rows):
            row_drafts = drafts_host[b][:proposed[b]]
            n_acc, token = self._accept(row_drafts, [q[b] if q is not None else None for q in qs[:proposed[b]]], p_logits[b, :proposed[b] + 1],
                                        sampler, opts)
            accepted = row_drafts[:n_acc] + [token]
            r.slots = slot0[b] + 1 + n_acc  # rejected drafts' slots are rewritten by the next step
            r.seq += accepted
            r.produced += len(accepted)
            self.seen[b, torch.tensor(accepted, device=self.device)] = True
            self.stats.drafted += proposed[b]
            self.stats.accepted += n_acc
            self.stats.verify_passes += 1
            if opts.adaptive_gamma:
                r.gamma = min(r.gamma + 2, MAX_GAMMA) if (proposed[b] and n_acc == proposed[b]) else max(1, r.gamma - 1)
            out[r.handle] = accepted
        self.stats.gamma = self.rows[0].gamma
        return out

    @staticmethod
    def _accept(drafts: list[int], qs: list, p_logits: torch.Tensor, sampler: Sampler,
                opts: DecodeOptions) -> tuple[int, int]:
        """(accepted drafts, next token) from one row's penalised target logits (n+1, V)."""
        n = len(drafts)
        if opts.greedy:
            target = p_logits.argmax(-1).tolist()
            n_acc = 0
            while n_acc < n and drafts[n_acc] == target[n_acc]:
                n_acc += 1
            return n_acc, target[n_acc]
        p = sampler.probs(p_logits)  # (n+1, V)
        for i, t in enumerate(drafts):
            if sampler.uniform() * qs[i][t].item() < p[i, t].item():  # accept with min(1, p/q)
                continue
            residual = (p[i] - qs[i]).clamp(min=0)
            if residual.sum().item() <= 0:  # p == q up to rounding: the rejection was numerical noise
                residual = p[i]
            return i, sampler.draw((residual / residual.sum())[None])[0].item()
        return n, sampler.draw(p[n][None])[0].item()
