"""Open-vocabulary classification of region embeddings (spec §4).

Class embeddings are [K, P, D] (P synonyms per class, unit-norm rows, see `vocab.text_embeddings`);
a zero background row is appended as class K. Region embeddings are [N, D] in the same text space.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def add_background(class_embeds: torch.Tensor) -> torch.Tensor:
    """[K, P, D] → [K+1, P, D] with an all-zero background row last (its cosine is always 0)."""
    if class_embeds.dim() != 3:
        raise ValueError(f"class embeddings must be [K, P, D], got {tuple(class_embeds.shape)}")
    return torch.cat([class_embeds, class_embeds.new_zeros(1, *class_embeds.shape[1:])], dim=0)


def class_logits(region: torch.Tensor, class_embeds: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """[N, D] regions × [C, P, D] classes → [N, C] logits = logit_scale × max over synonyms of the
    cosine. The region is L2-normalised here; class rows are used as given (unit-norm or zero)."""
    if region.dim() != 2 or class_embeds.dim() != 3 or region.shape[-1] != class_embeds.shape[-1]:
        raise ValueError(
            f"region {tuple(region.shape)} and class embeddings {tuple(class_embeds.shape)} do not match"
        )
    region = F.normalize(region.to(class_embeds.dtype), dim=-1)
    cos = torch.einsum("nd,cpd->ncp", region, class_embeds)
    return logit_scale * cos.amax(dim=-1)


def ensemble_probs(
    head_logits: torch.Tensor,
    clip_logits: Optional[torch.Tensor],
    seen: torch.Tensor,
    alpha: float = 0.1,
    beta: float = 0.9,
    use_clip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Geometric ensemble of the head's and the frozen CLIP's softmaxes → [N, K] foreground probs.

    head_logits, clip_logits: [N, K+1] (background last); seen: [K] bool. For seen classes
    p = p_head^(1-α)·p_clip^α, for unseen p_head^(1-β)·p_clip^β (not renormalised). Rows with
    use_clip False (e.g. an empty mask), or clip_logits None, use p_head alone.
    """
    k = head_logits.shape[-1] - 1
    if seen.shape != (k,):
        raise ValueError(f"seen mask {tuple(seen.shape)} does not match {k} classes")
    log_head = F.log_softmax(head_logits.float(), dim=-1)[:, :k]
    if clip_logits is None:
        return log_head.exp()
    if clip_logits.shape != head_logits.shape:
        raise ValueError(f"clip logits {tuple(clip_logits.shape)} vs head logits {tuple(head_logits.shape)}")
    log_clip = F.log_softmax(clip_logits.float(), dim=-1)[:, :k]
    w = torch.where(seen.to(log_head.device), alpha, beta).to(log_head.dtype)  # [K] weight of CLIP
    log_p = (1 - w) * log_head + w * log_clip
    if use_clip is not None:
        log_p = torch.where(use_clip.to(log_head.device).bool()[:, None], log_p, log_head)
    return log_p.exp()


def ensemble_background(
    head_logits: torch.Tensor,
    clip_logits: Optional[torch.Tensor],
    alpha: float = 0.1,
    use_clip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[N] probability of the background class (the last column) under the ensemble of
    `ensemble_probs`, the background counting as a class seen in training (CLIP weight α).
    Segment-everything drops a mask whose background probability beats its best class."""
    log_head = F.log_softmax(head_logits.float(), dim=-1)[:, -1]
    if clip_logits is None:
        return log_head.exp()
    log_p = (1 - alpha) * log_head + alpha * F.log_softmax(clip_logits.float(), dim=-1)[:, -1]
    if use_clip is not None:
        log_p = torch.where(use_clip.to(log_head.device).bool(), log_p, log_head)
    return log_p.exp()


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [N, k] long, scores [N, k]) of [N, K] foreground probs, best first; k ≤ K is enforced
    by clipping. Labels are contiguous indices 0..K-1 (map with `Vocabulary.category_ids`)."""
    k = max(1, min(int(k), probs.shape[-1]))
    scores, labels = probs.topk(k, dim=-1)
    return labels, scores


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, bg_weight: float = 0.1) -> torch.Tensor:
    """Weighted cross-entropy over K+1 classes (targets: [N] long, K = background).

    Each sample's loss is scaled by its class weight (1, or bg_weight for background) and the
    result is averaged over the N samples (mmdet's convention, not PyTorch's sum-of-weights mean).
    """
    weight = logits.new_ones(logits.shape[-1])
    weight[-1] = bg_weight
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets.long(), weight=weight.float(), reduction="none").mean()
