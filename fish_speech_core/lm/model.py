"""The Fish Speech 1.4 dual-AR text2semantic transformer (our own code, gpt-fast style).

A slow transformer runs over time steps. Its input at step t is the text embedding plus the
eight codebook embeddings of that step (codebooks only where the text id is ``<|semantic|>``).
It predicts the next text token. A fast transformer then runs over the codebooks of one step:
position 0 is the slow hidden state at t, positions 1..7 are codebooks 0..6 of step t+1, and
it predicts codebooks 0..7 of step t+1.

Module names equal the state-dict keys of the reference checkpoints (fixtures README 2 and 8),
and peft targets them by name: ``embeddings``, ``codebook_embeddings``, ``wqkv``, ``wo``,
``w1``/``w2``/``w3``, ``output``, ``fast_embeddings``, ``fast_output``.

Tensor layout: ``inputs`` is (B, 1 + num_codebooks, T); row 0 holds text ids, rows 1.. hold
``code + 1`` with 0 meaning "no code". Masks are named for what True means.

Generation (``lm.generate``) reuses the parts: :meth:`DualARTransformer.embed`, the slow
layers with a KV cache, :meth:`token_logits` on the pre-final-norm hidden state (what the
reference's ``forward_generate`` returns) and :meth:`fast_logits` one codebook position at a time.
Checkpoint folders are read and written by ``lm.checkpoint``; the model holds no tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fish_speech_core.lm.config import DualARConfig

AttentionImpl = Literal["sdpa", "explicit"]
ATTENTION_IMPLS = ("sdpa", "explicit")


# --- rotary embeddings -------------------------------------------------------------------


def precompute_rope(seq_len: int, n_elem: int, base: float) -> Tensor:
    """Rotary cos/sin table (seq_len, n_elem // 2, 2).

    Built in float32 and rounded to bfloat16 like the reference, then held as float32: the
    logits differ measurably if the table keeps full precision.
    """
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: n_elem // 2].float() / n_elem))
    angles = torch.outer(torch.arange(seq_len, device=freqs.device).float(), freqs)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return table.to(torch.bfloat16).float()


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate ``x`` (B, T, H, D) by ``rope`` (T, D // 2, 2), computing in float32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = rope.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * rope[..., 0] - xs[..., 1] * rope[..., 1],
            xs[..., 1] * rope[..., 0] + xs[..., 0] * rope[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


# --- building blocks ---------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # the reference normalises in float32 whatever the model dtype
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _silu_mul(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b, the product formed in silu's output (one (N, hidden) temporary less). The one
    definition of the SwiGLU's value: a LoRA w2 rebuilds its input with it, bit for bit."""
    return F.silu(a).mul_(b)


class _SwiGLU(torch.autograd.Function):
    """silu(a) * b that saves only a and b: autograd's silu-then-mul also kept silu(a), a third
    (N, hidden) tensor per layer (the fast layers run 8 positions per frame). silu is recomputed
    in backward with the same kernels, so the gradients are autograd's.

    With ``scratch`` (FeedForward: ``a`` and ``b`` are its w1/w3 outputs, which nothing else keeps;
    a LoRA w2 that rebuilds its input from them has run its backward already), backward writes
    ``a``'s gradient over ``a`` and forms its product in ``b``: one (N, hidden) tensor less at
    the backward's peak.
    A second backward through the same graph (retain_graph) is refused by autograd's version
    check, never computed from overwritten values."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, scratch: bool = False) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.scratch = scratch
        return _silu_mul(a, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        grad_b = F.silu(a).mul_(grad) if need_b else None
        grad_a = None
        if need_a and ctx.scratch:  # silu'(a) * (grad * b), the product formed in b and the result in a
            grad_a = torch.ops.aten.silu_backward.grad_input(b.mul_(grad), a, grad_input=a)
        elif need_a:
            grad_a = torch.ops.aten.silu_backward(grad * b, a)
        return grad_a, grad_b, None


def linear_on(layer: nn.Module, x: Tensor, rebuild: Callable[..., Tensor] | None = None, *sources: Tensor) -> Tensor:
    """``layer(x)`` where ``x == rebuild(*sources)`` and the caller's autograd keeps ``sources``
    anyway: a LoRA-adapted layer (finetune.lora_linear) then keeps no copy of ``x`` for its
    backward and rebuilds it there; any other layer just runs."""
    forward_rebuilt = getattr(layer, "forward_rebuilt", None)
    if rebuild is None or forward_rebuilt is None or not torch.is_grad_enabled():
        return layer(x)
    return forward_rebuilt(x, rebuild, *sources)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor, norm: nn.Module | None = None, norm_input: Tensor | None = None) -> Tensor:
        """``x`` is ``norm(norm_input)`` when both are given (see :func:`linear_on`)."""
        a, b = linear_on(self.w1, x, norm, norm_input), linear_on(self.w3, x, norm, norm_input)
        if not torch.is_grad_enabled():
            return self.w2(_silu_mul(a, b))
        return linear_on(self.w2, _SwiGLU.apply(a, b, True), _silu_mul, a, b)


class Attention(nn.Module):
    """Grouped-query attention with one fused q/k/v projection ``wqkv``."""

    def __init__(
        self,
        dim: int,
        n_head: int,
        n_local_heads: int,
        head_dim: int,
        qkv_bias: bool,
        dropout: float,
        impl: AttentionImpl,
    ) -> None:
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, not {impl!r}")
        self.n_head = n_head
        self.n_local_heads = n_local_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.impl = impl
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_local_heads) * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=False)

    def project(self, x: Tensor, rope: Tensor, norm: nn.Module | None = None,
                norm_input: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, dim) -> q (B, T, n_head, head_dim), k and v (B, T, n_local_heads, head_dim), rotated.

        ``x`` is ``norm(norm_input)`` when both are given (see :func:`linear_on`)."""
        b, t, _ = x.shape
        q_size = self.n_head * self.head_dim
        kv_size = self.n_local_heads * self.head_dim
        qk, v = linear_on(self.wqkv, x, norm, norm_input).split([q_size + kv_size, kv_size], dim=-1)
        # q and k rotated in one call (the same values: the rotation is elementwise per head);
        # halves the small ops of a decode step, where per-op overhead is the cost.
        qk = apply_rope(qk.view(b, t, self.n_head + self.n_local_heads, self.head_dim), rope)
        q, k = qk.split([self.n_head, self.n_local_heads], dim=2)
        # v's own copy: as a view it kept the whole q/k/v projection alive for backward
        return q, k, v.reshape(b, t, self.n_local_heads, self.head_dim).contiguous()

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, norm: nn.Module | None = None,
                norm_input: Tensor | None = None) -> Tensor:
        """x (B, T, dim); mask (B, 1, T, T) bool, True = may attend, or None for plain causal."""
        q, k, v = (y.transpose(1, 2) for y in self.project(x, rope, norm, norm_input))  # (B, H, T, head_dim)
        dropout_p = self.dropout if self.training else 0.0
        if self.impl == "sdpa":
            # SDPA shares each k/v head over its query group itself: no repeated copies of k and v
            # (kept for backward: 2 x 20 MiB per fast layer of a 2x1024 batch), and on CPU the
            # fast layers' 8-position attention ran ~5x faster in backward. Same values.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                enable_gqa=self.n_head != self.n_local_heads,
            )
            # SDPA keeps its output for backward; wo rebuilds its (rows, heads x dim) input from it
            # instead of keeping that copy too (see linear_on)
            return linear_on(self.wo, _heads_to_rows(y), _heads_to_rows, y)
        repeats = self.n_head // self.n_local_heads
        y = explicit_attention(q, k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1),
                               mask, dropout_p)
        return self.wo(_heads_to_rows(y))


def _heads_to_rows(y: Tensor) -> Tensor:
    """(B, H, T, head_dim) -> (B, T, H * head_dim)."""
    b, h, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, h * d)


def causal_mask(t: int, device: torch.device) -> Tensor:
    """(T, T) bool, True = query may attend to key."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float
) -> Tensor:
    """softmax(q kᵀ / sqrt(d) with −inf where masked) v: the reference's fast-attention path."""
    if mask is None:
        mask = causal_mask(q.size(-2), q.device)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p)
    return weights @ v


class TransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        n_head: int,
        n_local_heads: int,
        head_dim: int,
        intermediate_size: int,
        qkv_bias: bool,
        norm_eps: float,
        dropout: float,
        impl: AttentionImpl,
    ) -> None:
        super().__init__()
        # Registration order fixes the state-dict key order of the reference files.
        self.attention = Attention(dim, n_head, n_local_heads, head_dim, qkv_bias, dropout, impl)
        self.feed_forward = FeedForward(dim, intermediate_size)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.attention_norm = RMSNorm(dim, norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None) -> Tensor:
        # Each norm keeps its input for backward; the projections after it rebuild their input from
        # that instead of keeping the normed copy too (2 x (rows, dim) per layer; see linear_on).
        h = x + self.attention(self.attention_norm(x), rope, mask, self.attention_norm, x)
        return h + self.feed_forward(self.ffn_norm(h), self.ffn_norm, h)


# --- the model ---------------------------------------------------------------------------


@dataclass
class DualAROutput:
    """What :meth:`DualARTransformer.forward` returns.

    token_logits: (B, T, vocab_size). codebook_logits: (B, T, num_codebooks, codebook_size),
    exactly 0.0 on skipped rows. hidden_states: (B, T, dim), the slow transformer's output
    before the final norm (what the fast transformer consumes).
    """

    token_logits: Tensor
    codebook_logits: Tensor
    hidden_states: Tensor


class DualARTransformer(nn.Module):
    """Slow transformer over time + fast transformer over codebooks.

    Args:
        config: the model shape (``config.json``).
        semantic_token_id: id of ``<|semantic|>``; codebook embeddings are added only there.
            Passed as an int so the model never needs a tokenizer.
        attention_impl: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"explicit"``
            (materialised softmax, as the reference's fast transformer); a runtime choice, not
            part of the checkpoint.
    """

    def __init__(
        self,
        config: DualARConfig,
        semantic_token_id: int,
        attention_impl: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        if not 0 <= semantic_token_id < config.vocab_size:
            raise ValueError(
                f"semantic_token_id {semantic_token_id} is outside the vocabulary "
                f"(vocab_size {config.vocab_size})"
            )
        self.config = config
        self.semantic_token_id = semantic_token_id
        self.attention_impl = attention_impl
        c = config

        # Slow transformer. Attribute order = state-dict key order of the reference.
        self.embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.codebook_embeddings = nn.Embedding(c.codebook_size * c.num_codebooks, c.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(
                c.dim, c.n_head, c.n_local_heads, c.head_dim, c.intermediate_size,
                c.attention_qkv_bias, c.norm_eps, c.dropout, attention_impl,
            )
            for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if not c.tie_word_embeddings:
            self.output = nn.Linear(c.dim, c.vocab_size, bias=False)

        # Fast transformer. fast_project_in exists only when the widths differ (never in 1.4
        # checkpoints, so its layout is not covered by the fixtures).
        if c.fast_dim != c.dim:
            self.fast_project_in = nn.Linear(c.dim, c.fast_dim)
        else:
            self.fast_project_in = nn.Identity()
        self.fast_embeddings = nn.Embedding(c.codebook_size, c.fast_dim)
        self.fast_layers = nn.ModuleList(
            TransformerBlock(
                c.fast_dim, c.fast_n_head, c.fast_n_local_heads, c.fast_head_dim,
                c.fast_intermediate_size, c.fast_attention_qkv_bias, c.norm_eps, c.dropout,
                attention_impl,
            )
            for _ in range(c.n_fast_layer)
        )
        self.fast_norm = RMSNorm(c.fast_dim, c.norm_eps)
        self.fast_output = nn.Linear(c.fast_dim, c.codebook_size, bias=False)

        # Not in the state dict: rebuilt from the config (slow: max_seq_len, fast: one
        # position per codebook).
        self.register_buffer("rope", torch.empty(0), persistent=False)
        self.register_buffer("fast_rope", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)build the rotary tables, e.g. after building the model on the meta device."""
        c = self.config
        device = self.embeddings.weight.device if device is None else device
        if torch.device(device).type == "meta":  # shapes only; the math on meta would import torch._dynamo
            self.rope = torch.empty(c.max_seq_len, c.head_dim // 2, 2, device="meta")
            self.fast_rope = torch.empty(c.num_codebooks, c.fast_head_dim // 2, 2, device="meta")
            return
        with torch.device(device):
            self.rope = precompute_rope(c.max_seq_len, c.head_dim, c.rope_base)
            self.fast_rope = precompute_rope(c.num_codebooks, c.fast_head_dim, c.rope_base)

    # -- forward ---------------------------------------------------------------------------

    def embed(self, inputs: Tensor) -> Tensor:
        """inputs (B, 1 + K, T) -> (B, T, dim): text embedding + codebook embeddings."""
        c = self.config
        text = inputs[:, 0]
        offsets = torch.arange(c.num_codebooks, device=inputs.device) * c.codebook_size
        # Codebook i uses rows [i * codebook_size, (i + 1) * codebook_size) of one table.
        codes = self.codebook_embeddings(inputs[:, 1 : 1 + c.num_codebooks] + offsets[:, None])
        codes = codes * (text == self.semantic_token_id)[:, None, :, None].to(codes.dtype)
        # Stack-then-sum, like the reference, so float rounding matches.
        return torch.cat([self.embeddings(text)[:, None], codes], dim=1).sum(dim=1)

    def _run_layers(
        self, layers: nn.ModuleList, x: Tensor, rope: Tensor, mask: Tensor | None
    ) -> Tensor:
        for layer in layers:
            if self.config.use_gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask)
        return x

    def slow_hidden(self, inputs: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Slow transformer output before the final norm, (B, T, dim)."""
        t = inputs.size(2)
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.config.max_seq_len}")
        mask = None
        if key_padding_mask is not None:
            # (B, 1, T, T): causal AND key not padding.
            mask = causal_mask(t, inputs.device)[None, None] & ~key_padding_mask[:, None, None, :]
            if self.attention_impl == "sdpa":
                # SDPA turns a bool mask into an additive float one in every layer and keeps each
                # copy for backward (8 MiB per layer at 2x1024): made once here, shared by all.
                device = inputs.device.type
                dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                         else self.embeddings.weight.dtype)  # the dtype q has in the layers
                mask = torch.zeros(mask.shape, dtype=dtype, device=inputs.device).masked_fill_(~mask, float("-inf"))
        return self._run_layers(self.layers, self.embed(inputs), self.rope[:t], mask)

    def token_logits(self, hidden: Tensor) -> Tensor:
        """(B, T, dim) pre-norm hidden -> (B, T, vocab_size)."""
        normed = self.norm(hidden)
        if self.config.tie_word_embeddings:
            return F.linear(normed, self.embeddings.weight)
        return self.output(normed)

    def fast_logits(self, x: Tensor) -> Tensor:
        """Fast transformer over (N, K, fast_dim) codebook sequences -> (N, K, codebook_size)."""
        x = self._run_layers(self.fast_layers, x, self.fast_rope[: x.size(1)], None)
        return linear_on(self.fast_output, self.fast_norm(x), self.fast_norm, x)

    def fast_rows(self, inputs: Tensor) -> Tensor:
        """Which of the B·T positions (flattened, b-major) the fast transformer runs on, ascending.

        Rows whose next step has no codes (prompt, padding, last step) are skipped and their
        logits stay exactly 0.0.
        """
        b, _, t = inputs.shape
        next_codes = F.pad(inputs[:, 1 : self.config.num_codebooks, 1:], (0, 1))  # (B, K-1, T): codes of step t+1
        keep = (next_codes != 0).any(dim=1).reshape(b * t)
        if not keep.any():
            # Run a few rows anyway so every fast parameter is in the graph (DDP expects it).
            keep[: min(8, b * t)] = True
        return keep.nonzero().squeeze(1)

    def forward(self, inputs: Tensor, key_padding_mask: Tensor | None = None) -> DualAROutput:
        """Training/teacher-forced forward.

        Args:
            inputs: (B, 1 + num_codebooks, T) int64.
            key_padding_mask: (B, T) bool, True = padding; None = no padding.
        """
        c = self.config
        b, rows, t = inputs.shape
        if rows != 1 + c.num_codebooks:
            raise ValueError(
                f"inputs must be (B, {1 + c.num_codebooks}, T): one text row and "
                f"{c.num_codebooks} codebook rows, got {tuple(inputs.shape)}"
            )
        if key_padding_mask is not None and (
            key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (b, t)
        ):
            raise ValueError(
                f"key_padding_mask must be bool (B, T) = ({b}, {t}) with True = padding, got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        hidden = self.slow_hidden(inputs, key_padding_mask)
        return DualAROutput(
            token_logits=self.token_logits(hidden),
            codebook_logits=self.codebook_logits(inputs, hidden),
            hidden_states=hidden,
        )

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters :meth:`token_logits` uses (final norm and output layer, adapters included)."""
        head = self.embeddings if self.config.tie_word_embeddings else self.output
        return [*self.norm.parameters(), *head.parameters()]

    def codebook_logits(self, inputs: Tensor, hidden: Tensor) -> Tensor:
        """The fast transformer's teacher-forced logits (B, T, K, codebook_size) on the slow
        ``hidden`` (B, T, dim) of ``inputs``; exactly 0.0 on the rows :meth:`fast_rows` skips."""
        c = self.config
        b, _, t = inputs.shape
        # Fast input at t: [hidden(t), emb(code_0(t+1)), ..., emb(code_{K-2}(t+1))].
        next_codes = F.pad(inputs[:, 1 : c.num_codebooks, 1:], (0, 1))  # (B, K-1, T)
        x = torch.cat(
            [self.fast_project_in(hidden)[:, None], self.fast_embeddings(next_codes)], dim=1
        )  # (B, K, T, fast_dim)
        x = x.transpose(1, 2).reshape(b * t, c.num_codebooks, c.fast_dim)
        rows = self.fast_rows(inputs)
        logits = self.fast_logits(x.index_select(0, rows))
        # index_put_ (unlike index_copy) keeps only the row numbers for backward, not the logits
        codebook_logits = logits.new_zeros(b * t, c.num_codebooks, c.codebook_size).index_put_((rows,), logits)
        return codebook_logits.view(b, t, c.num_codebooks, c.codebook_size)


def init_weights(model: DualARTransformer, generator: torch.Generator | None = None) -> None:
    """The reference init: Linear/Embedding weights ~ N(0, initializer_range²), biases 0,
    RMSNorm weights 1. Draws in ``named_modules`` order from ``generator``."""
    std = model.config.initializer_range
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
