"""Merge a LoRA adapter into its base checkpoint folder, and prove the result is the same model."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fish_speech_core.files import (
    NotWritableError,
    OverlapError,
    atomic_path,
    atomic_torch_save,
    atomic_write,
    refuse_overlap,
    require_writable,
    sha256_file,
)
from fish_speech_core.finetune.lora import (
    LoraError,
    LoraSettings,
    add_lora,
    load_lora_state_dict,
    merge_lora,
    read_adapter,
)
from fish_speech_core.tokenizer import FishTokenizer
from fish_speech_core.weights import read_weights

PROBE_ATOL = 1e-3  # merged vs base+LoRA logits, fp32 base
HALF_ATOL = 5e-2  # bf16/fp16 base: the merged weights are rounded to the base dtype
FORMATS = ("pth", "safetensors")


class MergeError(ValueError):
    """A merge that cannot be done or did not verify; the message says why."""


@dataclass(frozen=True)
class MergeReport:
    output: Path
    changed_tensors: int
    total_tensors: int
    max_logit_diff: float
    adapter_metadata: bool


def probe_batch(vocab_size: int, num_codebooks: int, codebook_size: int, semantic_id: int,
                length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (2, 1+K, T) batch mixing text and semantic positions, and its padding mask."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.zeros(2, 1 + num_codebooks, length, dtype=torch.long)
    inputs[:, 0] = torch.randint(0, vocab_size, (2, length), generator=g)
    inputs[:, 0, length // 2 :] = semantic_id
    inputs[:, 1:, length // 2 :] = torch.randint(1, codebook_size + 1, (2, num_codebooks, length - length // 2), generator=g)
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[1, -3:] = True  # True = padding
    return inputs, mask


def _all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def merge_checkpoint(base: str | os.PathLike, lora_weight: str | os.PathLike, output: str | os.PathLike,
                     settings: LoraSettings, fmt: str = "pth") -> MergeReport:
    """Write ``output`` = ``base`` with the adapter folded in (same keys and dtypes), then verify.

    Raises:
        MergeError: output is the base folder, the adapter does not fit, it changes nothing, or
            the merged logits differ from base+LoRA.
    """
    from fish_speech_core.lm.checkpoint import MODEL_FILE, load_pretrained, normalize_state_dict

    base, output = Path(base), Path(output)
    if fmt not in FORMATS:
        raise MergeError(f"--format must be one of {FORMATS}, got {fmt!r}")
    try:  # the output is written: never the base folder, inside it, or around the adapter
        refuse_overlap([("base", base), ("--lora-weight", lora_weight)], output, "--output")
        require_writable(output, create=False)
    except (OverlapError, NotWritableError) as err:
        raise MergeError(str(err)) from None
    adapter = read_adapter(lora_weight)
    base_file = base / MODEL_FILE
    if adapter.metadata is not None:
        adapter.metadata.check(settings, sha256_file(base_file) if base_file.is_file() else None)
    base_state = normalize_state_dict(read_weights(base_file))
    base_dtypes = {k: v.dtype for k, v in base_state.items()}

    loaded = load_pretrained(base, dtype=torch.float32)
    model = add_lora(loaded.model, settings).eval()
    try:
        load_lora_state_dict(model, adapter.tensors)
    except LoraError as err:
        raise MergeError(f"{lora_weight} does not fit {base}: {err}") from None
    c = model.config
    inputs, mask = probe_batch(c.vocab_size, c.num_codebooks, c.codebook_size, model.semantic_token_id)
    with torch.no_grad():
        before = model(inputs, mask)
    if not _all_finite(before.token_logits, before.codebook_logits):
        raise MergeError(f"base+LoRA logits are not finite (NaN/Inf) on the probe batch: {base} or "
                         f"{lora_weight} is damaged; nothing written")
    merged = merge_lora(model)
    state = {k: v.detach().to(base_dtypes[k]).contiguous() for k, v in merged.state_dict().items()}
    not_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not _all_finite(v))
    if not_finite:
        raise MergeError(f"merged tensors hold NaN or Inf ({len(not_finite)}: {', '.join(not_finite[:3])}"
                         f"{', ...' if len(not_finite) > 3 else ''}) from {lora_weight} into {base}; nothing written")
    changed = sum(not torch.equal(state[k], base_state[k]) for k in state)
    if set(state) != set(base_state):
        raise MergeError(f"merged keys differ from the base: {sorted(set(state) ^ set(base_state))}")
    if changed == 0:
        raise MergeError("LoRA had no effect: every merged tensor equals the base (are lora_B all zero?)")

    # Written and verified in a hidden staging folder beside OUTPUT, published only once it
    # verifies: a failed merge leaves nothing a later run (or Fish Speech) could load.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".merge-tmp", dir=output.parent))
    try:
        diff = _write_and_verify(staging, loaded.tokenizer, c, state, base_state, base_dtypes, merged, fmt,
                                 inputs, mask, before)
        output.mkdir(parents=True, exist_ok=True)
        for file in sorted(staging.iterdir()):
            os.replace(file, output / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return MergeReport(output=output, changed_tensors=changed, total_tensors=len(state),
                       max_logit_diff=diff, adapter_metadata=adapter.metadata is not None)


def _write_and_verify(folder: Path, tokenizer: FishTokenizer, c, state, base_state, base_dtypes, merged,
                      fmt: str, inputs: torch.Tensor, mask: torch.Tensor, before) -> float:
    """Write the merged checkpoint into ``folder`` and return its max logit diff to base+LoRA.

    Raises:
        MergeError: the files on disk do not give the same model.
    """
    from fish_speech_core.lm.checkpoint import CONFIG_FILE, MODEL_FILE, load_pretrained, normalize_state_dict

    tokenizer.save(folder)
    with atomic_write(folder / CONFIG_FILE, "w") as handle:
        handle.write(c.to_json())
    if fmt == "safetensors":
        from safetensors.torch import save_file

        with atomic_path(folder / "model.safetensors") as tmp:
            save_file(state, str(tmp))
    else:
        atomic_torch_save(state, folder / MODEL_FILE)

    # Verify what is on disk, not what is in memory.
    if fmt == "pth":
        written = load_pretrained(folder, dtype=torch.float32).model.eval()
        on_disk = normalize_state_dict(read_weights(folder / MODEL_FILE))
    else:
        from safetensors.torch import load_file

        on_disk = load_file(str(folder / "model.safetensors"))
        written = merged.float()
        written.load_state_dict({k: v.float() for k, v in on_disk.items()})
    if set(on_disk) != set(base_state) or any(on_disk[k].dtype != base_dtypes[k] for k in on_disk):
        raise MergeError("written keys or dtypes differ from the base's")
    with torch.no_grad():
        after = written(inputs, mask)
    diff = max(
        (before.token_logits - after.token_logits).abs().max().item(),
        (before.codebook_logits - after.codebook_logits).abs().max().item(),
    )
    # A half-precision base rounds the merged weights to its dtype: compare at that precision.
    tolerance = PROBE_ATOL if all(d == torch.float32 for d in base_dtypes.values()) else HALF_ATOL
    if not diff <= tolerance:  # NaN compares false: a NaN diff is a failure, never a pass
        raise MergeError(f"merged logits differ from base+LoRA by {diff:.2e} (> {tolerance}); "
                         "nothing written")
    return diff
