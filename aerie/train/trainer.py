"""The training loop: a frozen target recomputes features on the fly, the head learns with
AdamW under a warm-up + cosine schedule, in bf16 autocast on a GPU; checkpoints allow
`--resume`; a JSONL log and a PNG plot record loss and per-step acceptance."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aerie.errors import InputError
from aerie.heads import DraftHead, build_draft_vocab, load_head, new_head, save_head
from aerie.target import Target
from aerie.train.data import Sample, answer_token_counts, collate, make_batches
from aerie.train.ttt import (
    StepStats,
    eagle1_loss,
    eagle3_loss,
    eagle3_targets,
    prediction_mask,
    target_forward,
    unroll,
)

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
PLOT = "training.png"
# --max-minutes: steps skipped, then steps timed, before the schedule is fitted to the budget;
# it is fitted again every TIMED_STEPS steps, from the speed of the latest ones, because the
# speed changes when a job sharing the GPU starts or ends.
WARM_STEPS = 10
TIMED_STEPS = 20


@dataclass
class TrainConfig:
    kind: str = "eagle3"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    batch_tokens: int = 16384
    epochs: float = 3.0
    steps: int | None = None  # overrides epochs
    ttt_steps: int = 7
    step_decay: float = 0.8
    draft_vocab: int = 8192
    feature_weight: float = 1.0  # EAGLE-1
    ce_weight: float = 0.1  # EAGLE-1
    noise: float = 0.2  # EAGLE-1 input feature noise
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("eagle3", "eagle1"):
            raise InputError(f"head kind must be eagle3 or eagle1, got {self.kind!r}")
        checks = [
            (self.lr > 0, "--lr must be > 0"),
            (self.batch_tokens >= 16, "--batch-tokens must be >= 16"),
            (self.epochs > 0, "--epochs must be > 0"),
            (self.steps is None or self.steps > 0, "--steps must be > 0"),
            (self.ttt_steps >= 1, "--ttt-steps must be >= 1"),
            (self.draft_vocab >= 2, "--draft-vocab must be >= 2"),
            (self.grad_clip > 0, "--grad-clip must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (self.save_every >= 1, "--save-every must be >= 1"),
            (self.eval_every >= 0, "--eval-every must be >= 0 (0: only at the end)"),
            (self.max_minutes is None or self.max_minutes > 0, "--max-minutes must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at `total`."""
    warmup = min(config.warmup_steps, max(1, total // 10))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_eagle3_head(head: DraftHead, target: Target, counts: torch.Tensor) -> None:
    """Draft vocabulary from the answer-token counts; the draft LM head and final norm start
    as the target's own rows and norm, which makes early training much faster."""
    d2t, t2d = build_draft_vocab(counts, head.config.draft_vocab_size)
    with torch.no_grad():
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
        lm = target.model.get_output_embeddings().weight
        if lm.shape[1] == head.lm_head.weight.shape[1]:
            head.lm_head.weight.copy_(lm[t2d.to(lm.device)].to(head.lm_head.weight))
        norm = getattr(getattr(target.model, "model", None), "norm", None)
        if norm is not None and norm.weight.shape == head.norm.weight.shape:
            head.norm.weight.copy_(norm.weight.to(head.norm.weight))


def initial_head(path: str | Path, target: Target, kind: str, draft_vocab: int | None) -> DraftHead:
    """A trained head to continue training from (on more or newer data), in float32."""
    head = load_head(path, target)
    if head.kind != kind:
        raise InputError(f"--init: '{path}' is an {head.kind} head, not {kind}")
    if draft_vocab is not None and head.config.draft_vocab_size != draft_vocab:
        raise InputError(f"--init: '{path}' drafts from {head.config.draft_vocab_size} tokens: "
                         f"pass --draft-vocab {head.config.draft_vocab_size}")
    # The tree measured best for the old weights is not measured for the new ones.
    if hasattr(head.config, "gpu_tree"):
        del head.config.gpu_tree
    return head.float()


def compute_stats(head: DraftHead, target: Target, batch, config: TrainConfig) -> StepStats:
    tb = target_forward(target.model, target.features, batch.input_ids)
    mask = prediction_mask(batch.lengths, batch.prompt_lens, batch.input_ids.shape[1])
    if config.kind == "eagle3":
        probs, in_vocab = eagle3_targets(tb.logits, head.t2d)
        del tb.logits
        outputs = unroll(head, tb.features, batch.input_ids, config.ttt_steps)
        return eagle3_loss(head, outputs, probs, in_vocab, mask, config.step_decay)
    return eagle1_loss(
        head, tb.features, batch.input_ids, tb.logits, mask,
        config.feature_weight, config.ce_weight, config.noise if head.training else 0.0,
    )


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate_heldout(head: DraftHead, target: Target, samples: list[Sample], config: TrainConfig, max_batches: int = 50) -> dict:
    """Per-step top-1 agreement and loss on held-out samples."""
    if not samples:
        return {}
    head.eval()
    device = target.device
    steps = config.ttt_steps if config.kind == "eagle3" else 1
    correct, count, loss, n = [0] * steps, [0] * steps, 0.0, 0
    for indices in make_batches(samples, config.batch_tokens, seed=12345, epoch=0)[:max_batches]:
        batch = collate(samples, indices).to(device)
        with _autocast(device):
            stats = compute_stats(head, target, batch, config)
        for k in range(len(stats.step_correct)):
            correct[k] += stats.step_correct[k]
            count[k] += stats.step_count[k]
        loss += float(stats.loss)
        n += 1
    head.train()
    return {"loss": loss / max(n, 1), "acc": [c / max(t, 1) for c, t in zip(correct, count)]}


def train(
    target: Target,
    train_samples: list[Sample],
    heldout: list[Sample],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    init: str | Path | None = None,
) -> dict:
    """Train a head of `config.kind` for `target`; writes the head (config.json +
    model.safetensors), checkpoint.pt, train_log.jsonl and training.png into `out_dir`.
    With `resume`, continue from out_dir/checkpoint.pt (the saved schedule, unless
    `config.steps` differs from the saved run's: then it is the new total). With `init`, start
    from that head's weights (and its draft vocabulary) instead of a new head; a resumed run
    takes its weights from the checkpoint, so `init` then changes nothing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = target.device
    ckpt_path = out / CHECKPOINT
    if target.features.kind != config.kind:
        raise InputError(f"the target exposes {target.features.kind} features but a {config.kind} head is being trained")

    torch.manual_seed(config.seed)
    draft_vocab = min(config.draft_vocab, target.vocab_size) if config.kind == "eagle3" else None
    if init is not None and not resume:
        head = initial_head(init, target, config.kind, draft_vocab)
    else:
        head = new_head(target, config.kind, draft_vocab).float()
    state = None
    if resume:
        if not ckpt_path.is_file():
            raise InputError(f"--resume: '{ckpt_path}' does not exist")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = state["config"]
        for key in ("kind", "draft_vocab", "ttt_steps", "batch_tokens", "seed"):
            if saved.get(key) != getattr(config, key):
                raise InputError(f"--resume: the checkpoint was made with {key}={saved.get(key)}, not {getattr(config, key)}")
        head.load_state_dict(state["head"])
    elif config.kind == "eagle3" and init is None:
        init_eagle3_head(head, target, answer_token_counts(train_samples, target.vocab_size))
    head.train()

    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    epoch_batches = make_batches(train_samples, config.batch_tokens, config.seed, 0)
    if not epoch_batches:
        raise InputError("no training batches: the data is empty")
    total = config.steps or max(1, int(round(config.epochs * len(epoch_batches))))
    step, epoch, index = 0, 0, 0
    history: list[dict] = []
    elapsed_before = 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, index = state["step"], state["epoch"], state["index"]
        total, history, elapsed_before = state["total"], state["history"], state.get("elapsed", 0.0)
        if config.steps is not None and config.steps != saved.get("steps"):
            total = config.steps  # a new --steps extends (or shortens) the run
        torch.set_rng_state(state["rng"])
        # Drop log lines written after the checkpoint.
        if (out / LOG).is_file():
            kept = [line for line in (out / LOG).read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
            (out / LOG).write_text("".join(k + "\n" for k in kept))
    elif (out / LOG).is_file():
        (out / LOG).unlink()

    steps_k = config.ttt_steps if config.kind == "eagle3" else 1
    acc_sum = [0] * steps_k
    acc_cnt = [0] * steps_k
    loss_sum, loss_n, tokens_seen = 0.0, 0, 0
    t_start = time.perf_counter()
    t_window = t_start
    first_step = step  # steps before it ran in an earlier process (--resume)
    requested_total = total
    t_timed = t_start
    bar = tqdm(total=total, initial=step, desc=f"train {config.kind}", unit="step", disable=not progress, dynamic_ncols=True)
    batches = make_batches(train_samples, config.batch_tokens, config.seed, epoch) if step else epoch_batches

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({
            "head": head.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(config),
            "step": step, "epoch": epoch, "index": index, "total": total, "history": history,
            "rng": torch.get_rng_state(), "elapsed": elapsed_before + time.perf_counter() - t_start,
        }, tmp)
        os.replace(tmp, ckpt_path)

    while step < total:
        if index >= len(batches):
            epoch, index = epoch + 1, 0
            batches = make_batches(train_samples, config.batch_tokens, config.seed, epoch)
        batch = collate(train_samples, batches[index]).to(device)
        index += 1
        lr = lr_at(step, total, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device):
            stats = compute_stats(head, target, batch, config)
        optimizer.zero_grad(set_to_none=True)
        stats.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        optimizer.step()
        step += 1
        loss_sum += float(stats.loss.detach())
        loss_n += 1
        tokens_seen += batch.tokens
        for k in range(len(stats.step_correct)):
            acc_sum[k] += stats.step_correct[k]
            acc_cnt[k] += stats.step_count[k]
        bar.update(1)

        timed = step - first_step - WARM_STEPS
        if config.max_minutes is not None and timed >= 0 and timed % TIMED_STEPS == 0:
            # Fit the schedule to the time left from the latest steps' speed (the first steps,
            # with allocator and kernel warm-up, run several times slower and are skipped).
            now = time.perf_counter()
            if timed > 0:
                per_step = (now - t_timed) / TIMED_STEPS
                budget = config.max_minutes * 60 - elapsed_before - (now - t_start)
                total = min(requested_total, step + max(1, int(budget / per_step)))
                bar.total = total
                bar.refresh()
            t_timed = now

        if step % config.log_every == 0 or step == total:
            now = time.perf_counter()
            acc = [a / max(c, 1) for a, c in zip(acc_sum, acc_cnt)]
            record = {
                "step": step, "epoch": epoch, "lr": lr, "loss": loss_sum / max(loss_n, 1), "acc": acc,
                "grad_norm": grad_norm, "tokens_per_s": tokens_seen / max(now - t_window, 1e-9),
                "elapsed_s": elapsed_before + now - t_start,
            }
            bar.set_postfix_str(f"loss {record['loss']:.3f} acc " + "/".join(f"{a:.2f}" for a in acc))
            if config.eval_every and (step % config.eval_every == 0 or step == total):
                record["heldout"] = evaluate_heldout(head, target, heldout, config)
            history.append(record)
            with (out / LOG).open("a") as f:
                f.write(json.dumps(record) + "\n")
            acc_sum, acc_cnt = [0] * steps_k, [0] * steps_k
            loss_sum, loss_n, tokens_seen, t_window = 0.0, 0, 0, now
        if step % config.save_every == 0 and step < total:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    save_head(head, out)
    final = evaluate_heldout(head, target, heldout, config)
    summary = {
        "kind": config.kind, "steps": step, "epochs": epoch + index / max(1, len(batches)),
        "train_samples": len(train_samples), "heldout_samples": len(heldout),
        "train_tokens": sum(len(s) for s in train_samples), "heldout": final,
        "elapsed_s": elapsed_before + time.perf_counter() - t_start, "config": asdict(config),
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_history(history, out / PLOT, title=f"{config.kind} head")
    return summary


def read_history(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_history(history: list[dict], path: str | Path, title: str = "") -> bool:
    """Loss and per-step top-1 agreement over training, as a small PNG. Returns False when
    matplotlib is not installed."""
    if not history:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("aerie: matplotlib is not installed; skipping the training plot")
        return False
    steps = [r["step"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    ax_loss.plot(steps, [r["loss"] for r in history], lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    n_steps = len(history[-1]["acc"])
    cmap = plt.get_cmap("viridis")
    for k in range(n_steps):
        ax_acc.plot(steps, [r["acc"][k] for r in history], lw=1, color=cmap(k / max(1, n_steps - 1)), label=f"step {k}")
    held = [(r["step"], r["heldout"]["acc"]) for r in history if r.get("heldout")]
    for k in range(n_steps):
        if held:
            ax_acc.plot([s for s, _ in held], [a[k] for _, a in held], "o", ms=3, color=cmap(k / max(1, n_steps - 1)))
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("top-1 agreement (dots: held out)")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, ncol=2, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
