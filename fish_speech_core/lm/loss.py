"""The training losses of the dual-AR model, as the reference's ``TextToSemantic._step`` logs them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fish_speech_core.formats.prompt import CODEBOOK_PAD_ID, IGNORE_INDEX  # noqa: F401 - re-exported


@dataclass(frozen=True)
class LMLosses:
    """base_loss: token CE; semantic_loss: codebook CE; loss = their sum (what is trained);
    top_5_accuracy: share of real codebook labels within the top-5 codebook logits."""

    base_loss: Tensor
    semantic_loss: Tensor
    loss: Tensor
    top_5_accuracy: Tensor


def lm_losses(token_logits: Tensor, codebook_logits: Tensor, labels: Tensor) -> LMLosses:
    """Cross-entropies with ignore index −100, both averaged over their non-ignored labels.

    Args:
        token_logits: (B, T, vocab_size).
        codebook_logits: (B, T, K, codebook_size).
        labels: (B, 1 + K, T); row 0 text labels, rows 1..K codebook labels (code + 1).

    The last semantic position of a sample has codebook label 0 (not −100) while its logits
    are exactly zero (the row is skipped), so each of its K labels adds ln(codebook_size):
    kept on purpose, it is what the reference trains on.
    """
    num_codebooks = codebook_logits.size(2)
    base_loss = F.cross_entropy(
        token_logits.reshape(-1, token_logits.size(-1)),
        labels[:, 0].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    codebook_labels = labels[:, 1 : 1 + num_codebooks].transpose(1, 2)  # (B, T, K)
    semantic_loss = F.cross_entropy(
        codebook_logits.reshape(-1, codebook_logits.size(-1)),
        codebook_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    return LMLosses(
        base_loss=base_loss,
        semantic_loss=semantic_loss,
        loss=base_loss + semantic_loss,
        top_5_accuracy=top_k_accuracy(codebook_logits, codebook_labels, k=5),
    )


@torch.no_grad()
def top_k_accuracy(logits: Tensor, labels: Tensor, k: int = 5) -> Tensor:
    """Share of labels (not −100, not the pad id 0) found in the top-k logits; 0.0 if none."""
    counted = (labels != IGNORE_INDEX) & (labels != CODEBOOK_PAD_ID)
    if not counted.any():
        return torch.zeros((), device=logits.device)
    top = logits.topk(k, dim=-1).indices  # (..., k)
    hits = (top == labels.unsqueeze(-1)).any(dim=-1) & counted
    return hits.sum().float() / counted.sum()
