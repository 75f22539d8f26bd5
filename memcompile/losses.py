"""Preference and policy-gradient losses, as plain PyTorch functions of a model's logits.

They follow TRL's definitions (DPO's sigmoid loss; GRPO's clipped per-token objective with a KL
term to a frozen reference) and are meant to be called inside the compiled step, where StreamBP
computes them chunk by chunk along the sequence without ever holding the full logits:

    step = torch.compile(lambda batch: dpo_loss(model(**batch["inputs"]).logits, ...),
                         backend="memcompile", options={"stream": True})

Labels are aligned with the logits (`labels[:, t]` is the token position `t` predicts, -100
where nothing is scored). Shift the labels, not the logits: a slice of the logits along the
sequence is not something the head can chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with the logits: position `t` predicts token `t + 1`.

    The last position, prompt tokens (the first `prompt_lengths[b]` of row `b`) and padding
    (`attention_mask == 0`) are not scored (-100).
    """
    labels = F.pad(input_ids, (0, 1), value=IGNORE_INDEX)[:, 1:].clone()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    if prompt_lengths is not None:
        labels[positions[None, :] + 1 < prompt_lengths[:, None]] = IGNORE_INDEX
    if attention_mask is not None:
        scored = F.pad(attention_mask, (0, 1), value=0)[:, 1:].bool()
        labels[~scored] = IGNORE_INDEX
    return labels


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`log p(labels[b, t])` under `logits[b, t]`, in at least float32; 0 where unscored."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (labels != IGNORE_INDEX)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its scored labels, shape `(batch,)`."""
    return token_logps(logits, labels).sum(-1)


def dpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """DPO's sigmoid loss (Rafailov et al.; TRL's `loss_type="sigmoid"`).

    `logits` and `labels` hold the chosen completions in the first half of the batch and the
    rejected ones in the second; `ref_*_logps` are the frozen reference model's
    `sequence_logps` of each, shape `(pairs,)`.
    """
    if logits.shape[0] % 2:
        raise ValueError(f"dpo_loss needs chosen then rejected rows: an even batch, got "
                         f"{logits.shape[0]}")
    logps = sequence_logps(logits, labels)
    pairs = logps.shape[0] // 2
    chosen, rejected = logps[:pairs], logps[pairs:]
    margin = (chosen - ref_chosen_logps) - (rejected - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


GRPO_LOSS_TYPES = ("grpo", "dapo")
"""How `grpo_loss` averages its per-token terms (TRL's `loss_type` of the same name)."""


def grpo_loss(logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor,
              old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None = None, *,
              beta: float = 0.04, epsilon: float = 0.2, loss_type: str = "grpo",
              num_items_in_batch: torch.Tensor | float | None = None,
              kl_bias_correction: bool = False) -> torch.Tensor:
    """GRPO's clipped per-token objective with a KL term to a frozen reference.

    `advantages` is `(batch,)`, one per completion; `old_logps` and `ref_logps` are
    `(batch, length)` log-probs of the labels under the sampling policy and the frozen
    reference, aligned with the labels (`ref_logps` may be None when `beta` is 0).
    `old_logps=None` is the on-policy step (one optimization step per generation): the policy's
    own log-probs, detached, so every ratio is 1 and only its gradient acts.

    Per token: `-min(r * A, clip(r, 1 - epsilon, 1 + epsilon) * A)` with `r = exp(logp - old)`,
    plus `beta * (exp(ref - logp) - (ref - logp) - 1)`; with `kl_bias_correction` the KL term
    is multiplied by `r` (differentiable), as TRL's `use_bias_correction_kl` does.

    `loss_type` says how the scored tokens' terms are averaged:

    - `"grpo"` (the default here): each completion's token mean, averaged over the batch.
    - `"dapo"` (the default of TRL's `GRPOConfig`): their sum over the batch divided by
      `num_items_in_batch`, the number of scored tokens; left None, those of this batch. With
      gradient accumulation, pass the count over all micro-batches of the step (and, with data
      parallelism, that global count divided by the number of ranks), as TRL does.

    The defaults here (`"grpo"`, `beta=0.04`, no bias correction) are the ones this function
    has always had. TRL 1.16's `GRPOConfig` defaults differ: `loss_type="dapo"`, `beta=0.0` and
    `use_bias_correction_kl=True` (here `kl_bias_correction=True`).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; valid: "
                         f"{list(GRPO_LOSS_TYPES)}")
    logps = token_logps(logits, labels)
    mask = (labels != IGNORE_INDEX).to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss with beta != 0 needs ref_logps")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.mean()
    count = mask.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
    return (per_token * mask).sum() / count


def contrastive_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over a batch of matching pairs (BASIC trains it at
    batches of tens of thousands): row `i` of each side matches row `i` of the other.

    The embeddings are L2-normalized here; `logit_scale` is the log of the temperature's
    inverse, as CLIP learns it.
    """
    image = F.normalize(image_embeddings, dim=-1)
    text = F.normalize(text_embeddings, dim=-1)
    logits = logit_scale.exp() * image @ text.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
