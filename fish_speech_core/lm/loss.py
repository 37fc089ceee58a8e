"""The training losses of the dual-AR model, as the reference's ``TextToSemantic._step`` logs them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fish_speech_core.formats.prompt import CODEBOOK_PAD_ID, IGNORE_INDEX  # noqa: F401 - re-exported


_CHUNK_ROWS = 256  # rows per pass over a (N, vocab) tensor: a few MB of temporaries, not another N x vocab


class _CrossEntropySum(torch.autograd.Function):
    """Sum over the rows of ``logsumexp(logits) - logits[label]``, rows labelled −100 left out.

    ``F.cross_entropy`` keeps its log_softmax (another N x vocab tensor, 256 MiB for a 2x1024
    batch of a 32k vocabulary) for backward and builds a dense gradient of it first. This keeps
    the logits and one log-sum-exp per row, and backward writes softmax − one-hot into the one
    gradient tensor it returns: with ``overwrite``, into the saved logits themselves (the caller
    reads them no more), so backward allocates nothing of that size. Same values up to float
    rounding."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, overwrite: bool) -> Tensor:
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        lse = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            lse[start:start + _CHUNK_ROWS] = torch.logsumexp(logits[start:start + _CHUNK_ROWS], dim=1)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logits, lse, safe, valid)
        ctx.overwrite = overwrite
        return torch.where(valid, lse - picked, torch.zeros((), dtype=lse.dtype, device=lse.device)).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, lse, safe, valid = ctx.saved_tensors
        out = logits if ctx.overwrite else torch.empty_like(logits)
        weight = (grad * valid).to(logits.dtype)  # (N,): d loss / d row, 0 for ignored rows
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            chunk = out[rows]
            torch.sub(logits[rows], lse[rows].unsqueeze(1), out=chunk)
            chunk.exp_()
            chunk.mul_(weight[rows].unsqueeze(1))
        out.scatter_add_(1, safe.unsqueeze(1), -weight.unsqueeze(1))
        return out, None, None


def cross_entropy_sum(logits: Tensor, labels: Tensor, overwrite: bool = False) -> Tensor:
    """``F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")`` for (N, C) logits,
    with less memory when it trains (:class:`_CrossEntropySum`). ``overwrite``: backward may
    write the gradient into ``logits`` (only for a caller that never reads them after backward)."""
    if not torch.is_grad_enabled() or not logits.requires_grad:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return _CrossEntropySum.apply(logits, labels, overwrite)


class _HeadCrossEntropySum(torch.autograd.Function):
    """``cross_entropy_sum(head(hidden), labels)`` whose gradients are computed in forward.

    The head's logits (B·T x 32k floats, 250 MiB at 2x1024) then live only inside this call: at
    the step's peak, in the fast transformer's forward and backward, they no longer coexist with
    its activations. Forward runs the head and its backward on a detached copy of ``hidden``
    (autograd.grad: nothing is accumulated), keeps the gradients of ``hidden`` and of the head's
    parameters that train, and backward returns them times the incoming scalar, so autograd (and
    DDP's hooks) accumulate them as for any layer. The head's randomness (adapter dropout) is
    drawn once, where the head runs in the forward, as before.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, head, labels: Tensor, *params: Tensor) -> Tensor:
        trains = [i for i, p in enumerate(params) if p.requires_grad]
        with torch.enable_grad():
            detached = hidden.detach().requires_grad_(hidden.requires_grad)
            logits = head(detached)
            total = cross_entropy_sum(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), True)
            del logits
            wrt = ([detached] if hidden.requires_grad else []) + [params[i] for i in trains]
            grads = list(torch.autograd.grad(total, wrt)) if wrt else []
        ctx.grad_hidden = grads.pop(0) if hidden.requires_grad else None
        ctx.grads = dict(zip(trains, grads))
        ctx.num_params = len(params)
        return total.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_hidden = None if ctx.grad_hidden is None else ctx.grad_hidden * grad
        grads = [ctx.grads[i] * grad if i in ctx.grads else None for i in range(ctx.num_params)]
        return grad_hidden, None, None, *grads


def head_cross_entropy_sum(head, hidden: Tensor, labels: Tensor, params: list[Tensor]) -> Tensor:
    """``cross_entropy_sum(head(hidden).reshape(-1, C), labels.reshape(-1))`` (ignore index −100)
    for a training step, without keeping the logits for backward (:class:`_HeadCrossEntropySum`).

    ``params``: every parameter ``head`` uses. Outside autograd it is the plain sum."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or any(p.requires_grad for p in params)):
        logits = head(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return _HeadCrossEntropySum.apply(hidden, head, labels, *params)


@dataclass(frozen=True)
class LMLosses:
    """base_loss: token CE; semantic_loss: codebook CE; loss = their sum (what is trained);
    top_5_accuracy: share of real codebook labels within the top-5 codebook logits."""

    base_loss: Tensor
    semantic_loss: Tensor
    loss: Tensor
    top_5_accuracy: Tensor


def lm_losses(token_logits: Tensor, codebook_logits: Tensor, labels: Tensor,
              logits_are_scratch: bool = False) -> LMLosses:
    """Cross-entropies with ignore index −100, both averaged over their non-ignored labels.

    Args:
        token_logits: (B, T, vocab_size).
        codebook_logits: (B, T, K, codebook_size).
        labels: (B, 1 + K, T); row 0 text labels, rows 1..K codebook labels (code + 1).

    The last semantic position of a sample has codebook label 0 (not −100) while its logits
    are exactly zero (the row is skipped), so each of its K labels adds ln(codebook_size):
    kept on purpose, it is what the reference trains on.
    """
    sums = lm_loss_sums(token_logits, codebook_logits, labels, logits_are_scratch)  # see lm_loss_sums
    # the mean over the non-ignored labels, what F.cross_entropy's default reduction gives (0/0 = nan)
    base_loss = sums.text_sum / sums.text_count
    semantic_loss = sums.code_sum / sums.code_count
    return LMLosses(
        base_loss=base_loss,
        semantic_loss=semantic_loss,
        loss=base_loss + semantic_loss,
        top_5_accuracy=sums.hits.float() / sums.counted.clamp(min=1),  # 0.0 when no label counts
    )


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

    def loss(self) -> Tensor:
        """The trained loss of these labels alone: token mean + codebook mean (:class:`LMLosses`)."""
        return self.text_sum / self.text_count + self.code_sum / self.code_count

    def stats(self) -> Tensor:
        """(6,) float64, detached: text_sum, text_count, code_sum, code_count, hits, counted."""
        return torch.stack([t.detach().double() for t in
                            (self.text_sum, self.text_count, self.code_sum, self.code_count, self.hits, self.counted)])


def lm_loss_sums(token_logits: Tensor | None, codebook_logits: Tensor, labels: Tensor,
                 logits_are_scratch: bool = False, text_sum: Tensor | None = None) -> LMLossSums:
    """:func:`lm_losses` before the division by the label counts (same shapes, same labels).

    ``logits_are_scratch``: the caller drops both logits after this call (a training step), so
    backward writes their gradients into them (:func:`cross_entropy_sum`'s ``overwrite``).
    ``text_sum``: the token cross-entropy sum, already computed (:func:`training_loss_sums`);
    ``token_logits`` is then not used."""
    num_codebooks = codebook_logits.size(2)
    text_labels = labels[:, 0].reshape(-1)
    if text_sum is None:
        text_sum = cross_entropy_sum(token_logits.reshape(-1, token_logits.size(-1)), text_labels, logits_are_scratch)
    codebook_labels = labels[:, 1 : 1 + num_codebooks].transpose(1, 2)  # (B, T, K)
    code_sum = cross_entropy_sum(codebook_logits.reshape(-1, codebook_logits.size(-1)), codebook_labels.reshape(-1),
                                 logits_are_scratch)
    with torch.no_grad():
        counted = (codebook_labels != IGNORE_INDEX) & (codebook_labels != CODEBOOK_PAD_ID)
        top = codebook_logits.topk(5, dim=-1).indices
        hits = ((top == codebook_labels.unsqueeze(-1)).any(dim=-1) & counted).sum()
    return LMLossSums(
        text_sum=text_sum, text_count=(text_labels != IGNORE_INDEX).sum(),
        code_sum=code_sum, code_count=(codebook_labels != IGNORE_INDEX).sum(),
        hits=hits, counted=counted.sum(),
    )


def training_loss_sums(model, inputs: Tensor, key_padding_mask: Tensor | None, labels: Tensor) -> LMLossSums:
    """:func:`lm_loss_sums` of a training step of ``model`` (a DualARTransformer): the same values
    as ``lm_loss_sums(out.token_logits.float(), out.codebook_logits.float(), labels)`` on
    ``out = model(inputs, key_padding_mask)`` (in fp32 up to float rounding), with the token
    head's logits never kept for backward and the codebook logits overwritten by their gradients."""
    hidden = model.slow_hidden(inputs, key_padding_mask)
    text_sum = head_cross_entropy_sum(lambda h: model.token_logits(h).float(), hidden, labels[:, 0],
                                      model.head_parameters())
    codebook_logits = model.codebook_logits(inputs, hidden).float()
    return lm_loss_sums(None, codebook_logits, labels, logits_are_scratch=True, text_sum=text_sum)
