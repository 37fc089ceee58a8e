"""Autoregressive generation with the dual-AR model (fixtures README, Addendum 2 ``generate/``).

Parts, top to bottom:

* :func:`encode_prompt`: text (+ reference-voice codes) -> the (1 + K, T) prompt tensor.
* :func:`logits_to_probs` / :func:`sample`: repetition penalty, top-p, temperature.
* :class:`KVCache` and :func:`slow_step` / :func:`fast_step`: the model's own layers run one
  position at a time against a key/value cache. The model file is untouched, so training
  numerics cannot change; peft-wrapped (LoRA) projections work because we only call them.
* :func:`decode_one_token` (one dual-AR step) and :func:`generate` (prefill + decode loop).

Codebook values in the returned sequence are in ``code + 1`` form (0 = no code), like the
prompt; :func:`semantic_codes` turns the new columns into codec codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fish_speech_core.formats.prompt import CODEBOOK_OFFSET, turn_prompt
from fish_speech_core.formats.text import clean_text
from fish_speech_core.lm.model import Attention, DualARTransformer, TransformerBlock
from fish_speech_core.threads import one_thread
from fish_speech_core.tokenizer import FishTokenizer

# Codebook penalty window: the last 16 generated columns (zeros before that many exist).
PENALTY_WINDOW = 16

# Decoding runs one position at a time: a model up to this width decodes faster on one CPU
# thread (fish_speech_core/threads.py has the measurements).
SINGLE_THREAD_MAX_DIM = 512


def _decode_threads(model: DualARTransformer, device: torch.device) -> AbstractContextManager[None]:
    return one_thread(device.type == "cpu" and model.config.dim <= SINGLE_THREAD_MAX_DIM)


# --- prompt ------------------------------------------------------------------------------


def encode_prompt(
    tokenizer: FishTokenizer,
    text: str,
    prompt_codes: Tensor | None = None,
    num_codebooks: int = 8,
) -> Tensor:
    """One user turn as a (1 + num_codebooks, T) tensor, the reference's ``encode_tokens``.

    The text is cleaned and wrapped as ``<|im_start|>user\\n{text}<|im_end|><|im_start|>
    assistant\\n``; row 0 holds its ids, rows 1.. are 0. With ``prompt_codes`` (K, n) the n
    code columns (``codes + 1`` under ``<|semantic|>``) and one ``<|im_end|>`` column follow.
    The result is int32, or the promoted dtype of ``prompt_codes`` (int64 codes give int64).
    """
    ids = tokenizer.encode(turn_prompt(clean_text(text)))
    text_part = torch.zeros(1 + num_codebooks, len(ids), dtype=torch.int32)
    text_part[0] = torch.tensor(ids, dtype=torch.int32)
    if prompt_codes is None:
        return text_part
    if prompt_codes.dim() != 2 or prompt_codes.size(0) != num_codebooks:
        raise ValueError(
            f"prompt codes must be ({num_codebooks}, frames), got {tuple(prompt_codes.shape)}"
        )
    n = prompt_codes.size(1)
    semantic = torch.full((1, n), tokenizer.semantic_id, dtype=torch.int32)
    codes = torch.cat([semantic, prompt_codes + CODEBOOK_OFFSET], dim=0)
    end = torch.zeros(1 + num_codebooks, 1, dtype=torch.int32)
    end[0, 0] = tokenizer.im_end_id
    return torch.cat([text_part, codes, end], dim=1)


# --- sampling ----------------------------------------------------------------------------


def logits_to_probs(
    logits: Tensor,
    previous_tokens: Tensor | None = None,
    temperature: Tensor | float = 0.7,
    top_p: Tensor | float = 0.7,
    repetition_penalty: Tensor | float = 1.2,
) -> Tensor:
    """(V,) logits -> (V,) probabilities, in the reference's order.

    The penalty is written back **into** ``logits`` (in place, as the reference does); a
    repeated id is penalised once. Top-p runs on the softmax of the un-tempered logits, drops
    sorted entries whose cumulative probability is > top_p and always keeps the first.
    """
    if previous_tokens is not None:
        prev = previous_tokens.long()
        score = torch.gather(logits, 0, prev)
        score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
        logits.scatter_(0, prev, score)

    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cum_probs = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_remove = cum_probs > top_p
    sorted_remove[0] = False  # keep at least one
    remove = sorted_remove.scatter(0, sorted_indices, sorted_remove)
    logits = logits.masked_fill(remove, -float("Inf"))
    logits = logits / torch.clamp_min(torch.as_tensor(temperature, dtype=logits.dtype), 1e-5)
    return torch.softmax(logits, dim=-1)


def sample(
    logits: Tensor,
    generator: torch.Generator | None,
    previous_tokens: Tensor | None = None,
    **sampling: Tensor | float,
) -> Tensor:
    """Draw one id from (V,) logits: argmax(probs / q), q ~ Exp(1) (the no-sync multinomial)."""
    probs = logits_to_probs(logits, previous_tokens, **sampling)
    q = torch.empty_like(probs, dtype=torch.float32).exponential_(1, generator=generator)
    return torch.argmax(probs.float() / q).to(torch.int32)


# --- KV cache and cached layers ----------------------------------------------------------


@dataclass
class KVCache:
    """Keys/values per layer: (layers, B, kv_heads, length, head_dim) each."""

    k: Tensor
    v: Tensor

    @classmethod
    def empty(
        cls,
        layers: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        batch: int = 1,
    ) -> "KVCache":
        shape = (layers, batch, kv_heads, length, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    @property
    def length(self) -> int:
        return self.k.size(3)

    def clear(self) -> None:
        self.k.zero_()
        self.v.zero_()


def _cached_attention(
    attn: Attention, x: Tensor, rope: Tensor, cache: KVCache, layer: int, start: int
) -> Tensor:
    """Attention for positions [start, start + T) of x (B, T, dim), writing k/v into the cache."""
    b, t, _ = x.shape
    q_size = attn.n_head * attn.head_dim
    q, k, v = attn.project(x, rope)
    end = start + t
    cache.k[layer, :, :, start:end] = k.transpose(1, 2)
    cache.v[layer, :, :, start:end] = v.transpose(1, 2)
    # Only keys [0, end) can be visible, so attend over that slice instead of the whole cache.
    keys = cache.k[layer, :, :, :end]
    values = cache.v[layer, :, :, :end]
    repeats = attn.n_head // attn.n_local_heads
    keys = keys.repeat_interleave(repeats, dim=1)
    values = values.repeat_interleave(repeats, dim=1)
    q = q.transpose(1, 2)  # (B, H, T, head_dim)
    if t == 1:  # one new query sees every cached key: no mask (SDPA's masked path is slow)
        y = F.scaled_dot_product_attention(q, keys, values)
    elif start == 0:  # prefill
        y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    else:  # (T, end) bool, True = may attend: query start + i sees keys <= start + i
        mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return attn.wo(y.transpose(1, 2).reshape(b, t, q_size))


def _cached_block(
    block: TransformerBlock, x: Tensor, rope: Tensor, cache: KVCache, layer: int, start: int
) -> Tensor:
    h = x + _cached_attention(block.attention, block.attention_norm(x), rope, cache, layer, start)
    return h + block.feed_forward(block.ffn_norm(h))


def new_slow_cache(model: DualARTransformer, length: int | None = None) -> KVCache:
    """A zeroed slow cache of ``length`` positions (default the model's max_seq_len)."""
    c = model.config
    w = model.embeddings.weight
    return KVCache.empty(
        c.n_layer, c.n_local_heads, length or c.max_seq_len, c.head_dim, w.dtype, w.device
    )


def new_fast_cache(model: DualARTransformer) -> KVCache:
    """A zeroed fast cache: one position per codebook."""
    c = model.config
    w = model.embeddings.weight
    return KVCache.empty(
        c.n_fast_layer, c.fast_n_local_heads, c.num_codebooks, c.fast_head_dim, w.dtype, w.device
    )


def slow_step(
    model: DualARTransformer, inputs: Tensor, start: int, cache: KVCache
) -> tuple[Tensor, Tensor]:
    """Slow transformer over inputs (B, 1 + K, T) at positions [start, start + T).

    Returns (token logits (B, V), pre-norm hidden (B, dim)) of the last position, which is
    what the reference's ``forward_generate`` returns.
    """
    t = inputs.size(2)
    if start + t > cache.length:
        raise ValueError(
            f"sequence of {start + t} positions exceeds the cache/max_seq_len ({cache.length})"
        )
    x = model.embed(inputs.long())
    rope = model.rope[start : start + t]
    for i, layer in enumerate(model.layers):
        x = _cached_block(layer, x, rope, cache, i, start)
    hidden = x[:, -1]
    return model.token_logits(hidden), hidden


def fast_step(model: DualARTransformer, x: Tensor, pos: int, cache: KVCache) -> Tensor:
    """Fast transformer at codebook position ``pos`` for x (B, 1, fast_dim) -> (B, codebook_size)."""
    rope = model.fast_rope[pos : pos + 1]
    for i, layer in enumerate(model.fast_layers):
        x = _cached_block(layer, x, rope, cache, i, pos)
    return model.fast_output(model.fast_norm(x))[:, -1]


# --- the dual-AR step and the loop ---------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling knobs (the reference's defaults for Fish Speech 1.4 inference)."""

    temperature: float = 0.7
    top_p: float = 0.7
    repetition_penalty: float = 1.2

    def as_kwargs(self) -> dict[str, Tensor]:
        # float32 0-d tensors, exactly as the reference passes them.
        return {
            "temperature": torch.tensor(self.temperature),
            "top_p": torch.tensor(self.top_p),
            "repetition_penalty": torch.tensor(self.repetition_penalty),
        }


def decode_one_token(
    model: DualARTransformer,
    inputs: Tensor,
    start: int,
    slow_cache: KVCache,
    fast_cache: KVCache,
    settings: dict[str, Tensor],
    generator: torch.Generator | None,
    previous_tokens: Tensor | None = None,
    on_logits: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor:
    """One dual-AR step: inputs (1, 1 + K, T) at ``start`` -> the next column (1 + K,) int32.

    The text token is sampled without penalty; codebook c with the penalty on row c + 1 of
    ``previous_tokens`` (1 + K, window). Codes are forced to 0 unless the token is
    ``<|semantic|>`` (the fast transformer still runs and still draws random numbers).
    ``on_logits(token_logits, codebook_logits)`` sees the logits before sampling edits them.
    """
    c = model.config
    logits, hidden = slow_step(model, inputs, start, slow_cache)
    token_logits = logits[0].float()  # sampling in fp32 (a no-op view for fp32 models)
    recorded = [] if on_logits is not None else None
    if recorded is not None:
        recorded_token = token_logits.clone()
    column = [sample(token_logits, generator, None, **settings)]

    fast_cache.clear()  # numerically irrelevant (causal mask), but as the reference does
    x = model.fast_project_in(hidden)[:, None]  # (1, 1, fast_dim)
    for k in range(c.num_codebooks):
        fast = fast_step(model, x, k, fast_cache)[0].float()
        if recorded is not None:
            recorded.append(fast.clone())
        window = None if previous_tokens is None else previous_tokens[k + 1]
        code = sample(fast, generator, window, **settings)
        column.append(code)
        x = model.fast_embeddings(code.long().view(1, 1))
    if on_logits is not None:
        on_logits(recorded_token, torch.stack(recorded))

    out = torch.stack(column)
    if out[0] != model.semantic_token_id:
        out[1:] = 0
    return out


@dataclass(frozen=True)
class GenerationResult:
    """sequence: (1 + K, T + n) int32, prompt then new columns; ``new_tokens`` = n."""

    sequence: Tensor
    prompt_length: int
    seconds: float

    @property
    def new_tokens(self) -> int:
        return self.sequence.size(1) - self.prompt_length

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@torch.inference_mode()
def generate(
    model: DualARTransformer,
    prompt: Tensor,
    im_end_id: int,
    max_new_tokens: int = 1024,
    settings: SamplingSettings = SamplingSettings(),
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
    on_logits: Callable[[Tensor, Tensor], None] | None = None,
    on_window: Callable[[Tensor | None], None] | None = None,
) -> GenerationResult:
    """Prefill the prompt (1 + K, T), then decode up to ``max_new_tokens`` columns.

    Reference quirks kept (README "Generation quirks"): the prefill column gets no penalty and
    is not checked for ``<|im_end|>``; every later column stops generation at ``<|im_end|>``
    (and is kept). The penalty window is a zero-filled buffer of the decode-loop columns:
    slots 0..15 before step 16, then the last 16. ``on_step(n)`` is called after each column
    (progress); ``on_logits``/``on_window`` expose the raw logits and penalty windows (tests).
    """
    c = model.config
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if prompt.dim() != 2 or prompt.size(0) != 1 + c.num_codebooks:
        raise ValueError(f"prompt must be (1 + {c.num_codebooks}, T), got {tuple(prompt.shape)}")
    t = prompt.size(1)
    max_new_tokens = min(max_new_tokens, c.max_seq_len - t)
    if max_new_tokens < 1:
        raise ValueError(
            f"the prompt has {t} positions: no room left within max_seq_len {c.max_seq_len}"
        )
    device = model.embeddings.weight.device
    kwargs = settings.as_kwargs()
    slow_cache = new_slow_cache(model, t + max_new_tokens)
    fast_cache = new_fast_cache(model)
    started = time.perf_counter()
    with _decode_threads(model, device):
        columns = _decode_loop(
            model, prompt, im_end_id, max_new_tokens, kwargs, slow_cache, fast_cache,
            generator, on_step, on_logits, on_window,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    sequence = torch.cat([prompt.to(torch.int32), torch.stack(columns, dim=1).cpu()], dim=1)
    return GenerationResult(sequence=sequence, prompt_length=t, seconds=seconds)


def _decode_loop(
    model: DualARTransformer,
    prompt: Tensor,
    im_end_id: int,
    max_new_tokens: int,
    kwargs: dict[str, Tensor],
    slow_cache: KVCache,
    fast_cache: KVCache,
    generator: torch.Generator | None,
    on_step: Callable[[int], None] | None,
    on_logits: Callable[[Tensor, Tensor], None] | None,
    on_window: Callable[[Tensor | None], None] | None,
) -> list[Tensor]:
    """The prefill column then the decode loop of :func:`generate`: the list of new columns."""
    c = model.config
    device = model.embeddings.weight.device
    t = prompt.size(1)
    if on_window is not None:
        on_window(None)
    column = decode_one_token(
        model, prompt.to(device)[None], 0, slow_cache, fast_cache, kwargs, generator,
        None, on_logits,
    )
    columns = [column]
    if on_step is not None:
        on_step(1)
    window_buf = torch.zeros(1 + c.num_codebooks, max_new_tokens, dtype=torch.int32, device=device)
    for i in range(max_new_tokens - 1):
        lo = max(0, i - PENALTY_WINDOW)
        window = window_buf[:, lo : max(PENALTY_WINDOW, i)]
        if window.size(1) < PENALTY_WINDOW:  # short generations: zeros past the buffer
            window = F.pad(window, (0, PENALTY_WINDOW - window.size(1)))
        if on_window is not None:
            on_window(window[1:].clone())
        column = decode_one_token(
            model, column.view(1, -1, 1), t + i, slow_cache, fast_cache, kwargs, generator,
            window, on_logits,
        )
        window_buf[:, i] = column
        columns.append(column)
        if on_step is not None:
            on_step(len(columns))
        if column[0] == im_end_id:
            break
    return columns


@torch.inference_mode()
def generate_uncached(
    model: DualARTransformer,
    prompt: Tensor,
    im_end_id: int,
    max_new_tokens: int,
    settings: SamplingSettings = SamplingSettings(),
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Like :func:`generate` but re-running the slow transformer over the whole sequence at
    every step (no slow KV cache). Only for benchmarks and as a cross-check of the cache."""
    c = model.config
    kwargs = settings.as_kwargs()
    t = prompt.size(1)
    seq = prompt.to(torch.int32)
    window_buf = torch.zeros(1 + c.num_codebooks, max_new_tokens, dtype=torch.int32)
    started = time.perf_counter()
    with _decode_threads(model, seq.device):
        for i in range(max_new_tokens):
            cache = new_slow_cache(model, seq.size(1))
            window = None
            if i >= 1:
                j = i - 1
                window = window_buf[:, max(0, j - PENALTY_WINDOW) : max(PENALTY_WINDOW, j)]
                window = F.pad(window, (0, PENALTY_WINDOW - window.size(1)))
            column = decode_one_token(
                model, seq[None], 0, cache, new_fast_cache(model), kwargs, generator, window
            )
            if i >= 1:
                window_buf[:, i - 1] = column
            seq = torch.cat([seq, column[:, None]], dim=1)
            if i >= 1 and column[0] == im_end_id:
                break
    return GenerationResult(seq, t, time.perf_counter() - started)


def semantic_codes(result: GenerationResult, semantic_id: int, codebook_size: int) -> Tensor:
    """The generated ``<|semantic|>`` columns as codec codes (K, n) int64 in [0, codebook_size).

    Values are ``code + 1``; a 0 (possible from an untrained model) and values past the codec's
    codebook are clamped into range so any model's output can be decoded.
    """
    new = result.sequence[:, result.prompt_length :]
    keep = new[0] == semantic_id
    codes = new[1:, keep].long() - CODEBOOK_OFFSET
    return codes.clamp(0, codebook_size - 1)


def build_prompt(
    tokenizer: FishTokenizer,
    text: str,
    context: Sequence[tuple[str, Tensor]] = (),
    num_codebooks: int = 8,
) -> Tensor:
    """Reference-voice / previous-chunk turns (text, codes (K, n)) followed by the target turn."""
    parts = [encode_prompt(tokenizer, t, codes, num_codebooks) for t, codes in context]
    parts.append(encode_prompt(tokenizer, text, None, num_codebooks))
    return torch.cat(parts, dim=1)
