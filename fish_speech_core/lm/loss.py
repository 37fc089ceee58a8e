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


@dataclass(frozen=True)
class LMLossSums:
    """The parts of :class:`LMLosses` as sums and counts, so several batches (or ranks) combine
    into exactly the mean over all their labels: ``base_loss = text_sum / text_count``.

    ``text_sum`` and ``code_sum`` carry the graph; the counts and hits are plain (no grad)."""

    text_sum: Tensor
    text_count: Tensor
    code_sum: Tensor
    code_count: Tensor
    hits: Tensor  # top-5 hits among the counted codebook labels
    counted: Tensor  # codebook labels that are neither ignored nor the pad id

    def stats(self) -> Tensor:
        """(6,) float64, detached: text_sum, text_count, code_sum, code_count, hits, counted."""
        return torch.stack([t.detach().double() for t in
                            (self.text_sum, self.text_count, self.code_sum, self.code_count, self.hits, self.counted)])


def lm_loss_sums(token_logits: Tensor, codebook_logits: Tensor, labels: Tensor) -> LMLossSums:
    """:func:`lm_losses` before the division by the label counts (same shapes, same labels)."""
    num_codebooks = codebook_logits.size(2)
    text_labels = labels[:, 0].reshape(-1)
    text_sum = F.cross_entropy(token_logits.reshape(-1, token_logits.size(-1)), text_labels,
                               ignore_index=IGNORE_INDEX, reduction="sum")
    codebook_labels = labels[:, 1 : 1 + num_codebooks].transpose(1, 2)  # (B, T, K)
    code_sum = F.cross_entropy(codebook_logits.reshape(-1, codebook_logits.size(-1)), codebook_labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        counted = (codebook_labels != IGNORE_INDEX) & (codebook_labels != CODEBOOK_PAD_ID)
        top = codebook_logits.topk(5, dim=-1).indices
        hits = ((top == codebook_labels.unsqueeze(-1)).any(dim=-1) & counted).sum()
    return LMLossSums(
        text_sum=text_sum, text_count=(text_labels != IGNORE_INDEX).sum(),
        code_sum=code_sum, code_count=(codebook_labels != IGNORE_INDEX).sum(),
        hits=hits, counted=counted.sum(),
    )
