"""Training-time test (EAGLE-3) and the EAGLE-1 objective, as pure functions over tensors.

Conventions (the same as the drafter's): head position i holds the pair (feature_i,
token_{i+1}) at position id i, and its output predicts token_{i+2}. In the unroll, step k
(k = 0 .. steps-1) feeds, at every position i, the head's own step-(k-1) output at i in place
of the target feature, with the data token token_{i+k+1}, at position id i + k. This is
exactly what drafting a chain from the last committed position i does: the step-k entry
attends to the committed pairs 0..i (step-0 keys at positions <= i) and to its own chain of
earlier drafted entries (the step-1..k keys at the same i), which `ttt_attention_mask`
encodes. So step k's output at position i is the draft's (k+1)-th token after committing
token_{i+1}, and it is trained against the target's distribution for token_{i+k+2}.

This is also SafeAILab/EAGLE `traineagle3/cnets.py` as it stands: step-0 keys causal, the
later steps' keys on the diagonal, position ids + k. Its first release also hid one more
step-0 diagonal per step (step k saw step-0 keys <= i - k only); upstream removed that as
wrong (commit 09b1628, "remove wrong attn mask update"): drafting never hides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aerie.heads import DraftHead
from aerie.target import FeatureSpec, forward_features


@dataclass
class TargetBatch:
    features: torch.Tensor  # [b, n, F]
    logits: torch.Tensor  # [b, n, V]


@torch.no_grad()
def target_forward(model, spec: FeatureSpec, input_ids: torch.Tensor) -> TargetBatch:
    """Features and logits of right-padded sequences [b, n] in one causal forward (padding
    sits after every real token, so it changes none of them)."""
    last, features = forward_features(model, spec, input_ids=input_ids, use_cache=False)
    return TargetBatch(features=features, logits=model.get_output_embeddings()(last))


def shift_left(x: torch.Tensor, k: int, fill) -> torch.Tensor:
    """x[:, k:] padded at the end with `fill` back to x's length (dim 1)."""
    if k == 0:
        return x
    pad = torch.full_like(x[:, :k], fill)
    return torch.cat([x[:, k:], pad], dim=1)


def prediction_mask(lengths: torch.Tensor, prompt_lens: torch.Tensor, n: int) -> torch.Tensor:
    """[b, n]: True at positions j whose next token (j + 1) is a real answer token, i.e.
    prompt_len - 1 <= j <= length - 2. The target's logits at j are a training label there."""
    j = torch.arange(n, device=lengths.device)[None]
    return (j >= prompt_lens[:, None] - 1) & (j <= lengths[:, None] - 2)


def ttt_attention_mask(n: int, step: int, device=None) -> torch.Tensor:
    """[1, 1, n, (step + 1) * n] boolean: the queries of unroll step `step` over the keys of
    steps 0..step. Step-0 keys are causal (position <= i); the keys of steps 1..step are
    visible only at the query's own position (the diagonal)."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return torch.cat([causal] + [eye] * step, dim=1)[None, None]


def unroll(head: DraftHead, features: torch.Tensor, input_ids: torch.Tensor, steps: int, pad_id: int = 0) -> list[torch.Tensor]:
    """Run the head for `steps` TTT steps on [b, n] sequences. Returns each step's hidden
    output [b, n, h]; step k at position i predicts token_{i+k+2}."""
    b, n = input_ids.shape
    cache = head.new_cache()
    positions = torch.arange(n, device=input_ids.device)[None].expand(b, n)
    x = features
    outputs = []
    for k in range(steps):
        ids = shift_left(input_ids, k + 1, pad_id)
        x = head(x, ids, positions + k, ttt_attention_mask(n, k, input_ids.device), cache)
        outputs.append(x)
    return outputs


@dataclass
class StepStats:
    loss: torch.Tensor  # scalar, the weighted sum the optimiser sees
    step_losses: list[float]
    step_correct: list[int]  # top-1 agreements with the target at each step
    step_count: list[int]  # positions with a label at each step


def eagle3_targets(logits: torch.Tensor, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's distribution restricted to the draft vocabulary [b, n, D] (float32), and
    whether the target's top token is in the draft vocabulary [b, n]."""
    in_vocab = t2d[logits.argmax(-1)]
    probs = torch.softmax(logits[..., t2d].float(), dim=-1)
    return probs, in_vocab


def eagle3_loss(
    head: DraftHead,
    outputs: list[torch.Tensor],
    target_probs: torch.Tensor,
    in_vocab: torch.Tensor,
    pred_mask: torch.Tensor,
    decay: float = 0.8,
) -> StepStats:
    """Soft cross-entropy of each unroll step against the target's restricted distribution,
    weighted decay**k. Positions whose target top token lies outside the draft vocabulary
    carry no loss (the draft cannot produce it) but count as misses in the agreement."""
    n = target_probs.shape[1]
    total = target_probs.new_zeros(())
    losses, correct, count = [], [], []
    for k, hidden in enumerate(outputs):
        width = n - k - 1
        if width <= 0:
            break
        logp = head.draft_logprobs(hidden[:, :width])
        p = target_probs[:, k + 1 :]
        valid = pred_mask[:, k + 1 :]
        m = valid & in_vocab[:, k + 1 :]
        ce = -(p * logp).sum(-1)
        loss_k = (ce * m).sum() / m.sum().clamp_min(1)
        total = total + (decay**k) * loss_k
        losses.append(float(loss_k.detach()))
        correct.append(int(((logp.argmax(-1) == p.argmax(-1)) & m).sum()))
        count.append(int(valid.sum()))
    return StepStats(total, losses, correct, count)


def eagle1_loss(
    head: DraftHead,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    logits: torch.Tensor,
    pred_mask: torch.Tensor,
    feature_weight: float = 1.0,
    ce_weight: float = 0.1,
    noise: float = 0.0,
) -> StepStats:
    """EAGLE-1: the head at position i regresses the target's next feature (feature_{i+1})
    with SmoothL1, plus a soft cross-entropy of the target's LM head on it against the
    target's distribution for token_{i+2}. `noise` adds uniform noise in
    [-noise/2, noise/2] to the input features, as the EAGLE-1 recipe does."""
    b, n = input_ids.shape
    x = features
    if noise > 0:
        x = x + (torch.rand_like(x, dtype=torch.float32) - 0.5).to(x.dtype) * noise
    positions = torch.arange(n, device=input_ids.device)[None].expand(b, n)
    hidden = head(x, shift_left(input_ids, 1, 0), positions, None)
    pred = hidden[:, : n - 1]
    valid = pred_mask[:, 1:]
    denom = valid.sum().clamp_min(1)
    vloss = (F.smooth_l1_loss(pred.float(), features[:, 1:].float(), reduction="none").mean(-1) * valid).sum() / denom
    logp = head.draft_logprobs(pred)
    p = torch.softmax(logits[:, 1:].float(), dim=-1)
    ploss = (-(p * logp).sum(-1) * valid).sum() / denom
    loss = feature_weight * vloss + ce_weight * ploss
    correct = int(((logp.argmax(-1) == p.argmax(-1)) & valid).sum())
    return StepStats(loss, [float(loss.detach())], [correct], [int(valid.sum())])
