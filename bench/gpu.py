"""GPU benchmark: real-size LoRA training, extraction and generation on one CUDA card, as JSON.

    python bench/gpu.py [--json bench/results/gpu-<card>.json] [--budget-s 420]
    python bench/gpu.py --smoke            # tiny sizes on the CPU: proves the script runs (the test suite does this)

Measures, each with its peak GPU memory (``torch.cuda.max_memory_allocated``):
- **train**: the real-size dual-AR model (``fish-speech-1.4`` preset, random weights: speed does
  not depend on values) with LoRA r 8 / alpha 16 / dropout 0.01, one full step (forward, backward,
  clip, AdamW) under bf16 autocast, at the largest batch x length of ``TRAIN_SHAPES`` that fits;
  eager and ``torch.compile``; tokens/s and MFU. MFU counts 4 x params FLOPs per token (forward
  2N, backward through frozen weights 2N; LoRA weight-gradients are negligible) plus attention,
  against the card's dense bf16 peak from ``PEAK_BF16_TFLOPS`` (null when the card is not listed).
- **extract**: the real-size Firefly encoder through fishtune's own loop (files decoded, resampled,
  length-bucketed, batch 16) in fp32 and bf16, and the fraction of bf16 codes equal to fp32.
- **generate**: tokens/s of ``generate`` (slow KV cache) eager and with ``slow_step`` /
  ``fast_step`` compiled (``dynamic=True``), a voice-clone-like prompt, ``<|im_end|>`` disabled.
Every part records its own error instead of stopping the run (an OOM or a compile failure is a
figure too). The baseline of each ratio is measured in the same run: compiled / eager, bf16 / fp32.
Not a test; ``tests/test_bench_gpu.py`` runs ``--smoke``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/gpu.py` from anywhere

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0, "A6000": 155.0}
TRAIN_SHAPES = ((8, 2048), (8, 1024), (4, 1024), (2, 1024), (1, 1024))  # (batch, length), largest first
SMOKE_SHAPES = ((2, 128),)


def _peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # insertion order: specific names before generic ones
        if key in device_name:
            return value
    return None


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_memory(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def _guarded(name: str, fn: Callable[[], dict]) -> dict:
    """Run one measurement; an exception becomes its recorded error (OOM, compile failure)."""
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark part that fails is reported, the rest runs
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                  "where": traceback.format_exc().strip().splitlines()[-3:]}
    result["wall_s"] = round(time.perf_counter() - started, 2)
    print(f"  {name}: {json.dumps({k: v for k, v in result.items() if k != 'where'})}", flush=True)
    return result


def _lm(preset: str, device: str):
    import torch

    from fish_speech_core.lm import PRESETS, DualARTransformer, init_weights

    config = replace(PRESETS[preset], use_gradient_checkpointing=False)
    with torch.device("meta"):
        model = DualARTransformer(config, semantic_token_id=5)
    model.to_empty(device=device)
    model.reset_buffers(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    cpu_model = None
    if device != "cpu":  # init on the CPU (seeded, same values everywhere), then move
        with torch.device("meta"):
            cpu_model = DualARTransformer(config, semantic_token_id=5)
        cpu_model.to_empty(device="cpu")
        cpu_model.reset_buffers("cpu")
        init_weights(cpu_model, generator)
        model.load_state_dict(cpu_model.state_dict())
        del cpu_model
    else:
        init_weights(model, generator)
    return model, config


# --------------------------------------------------------------------------- train


def _train_case(preset: str, device: str, batch: int, length: int, compiled: bool, steps: int) -> dict:
    import torch

    from bench.forward import make_batch
    from fish_speech_core.finetune.lora import LoraSettings, add_lora, lora_parameters
    from fish_speech_core.lm import lm_losses, training_loss_sums

    _reset_memory(device)
    model, config = _lm(preset, device)
    add_lora(model, LoraSettings(dropout=0.01)).train()
    params = [p for _, p in lora_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    inputs, labels, padding = (t.to(device) for t in make_batch(batch, length, config.vocab_size, 5,
                                                                 torch.Generator().manual_seed(0)))
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> float:
        with autocast:
            if compiled:  # the whole forward compiled, then the plain losses
                out = forward(inputs, padding)
                loss = lm_losses(out.token_logits, out.codebook_logits, labels).loss
            else:  # what `fishtune train` runs
                loss = training_loss_sums(model, inputs, padding, labels).loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    started = time.perf_counter()
    step()  # warm-up (and compilation)
    step()
    _sync(device)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - started
    tokens_per_s = steps * batch * length / elapsed
    n_params = sum(p.numel() for p in model.parameters())
    # attention: 2 matmuls x 2 FLOPs x length x dim per token and layer, x3 for forward + backward
    attention = 12 * config.n_layer * length * config.dim
    flops_per_token = 4 * n_params + attention
    peak = _peak_tflops(torch.cuda.get_device_name()) if device == "cuda" else None
    del model, optimizer, forward
    return {"batch": batch, "length": length, "compiled": compiled, "tokens_per_s": round(tokens_per_s, 1),
            "s_per_step": round(elapsed / steps, 4), "warmup_s": round(warmup_s, 1), "loss": round(loss, 4),
            "params_m": round(n_params / 1e6, 1), "mfu": None if peak is None else
            round(tokens_per_s * flops_per_token / (peak * 1e12), 4), "peak_mib": _peak_mib(device)}


def bench_train(preset: str, device: str, shapes, steps: int, compile_too: bool) -> dict:
    import torch

    out: dict = {"preset": preset, "dtype": "bf16-autocast" if device == "cuda" else "fp32", "cases": []}
    chosen = None
    for batch, length in shapes:  # the largest shape that fits, eager
        case = _guarded(f"train eager {batch}x{length}", lambda b=batch, n=length: _train_case(preset, device, b, n, False, steps))
        out["cases"].append(case)
        if "error" not in case:
            chosen = (batch, length)
            break
        if device == "cuda":
            torch.cuda.empty_cache()
    if chosen and compile_too:
        case = _guarded(f"train compiled {chosen[0]}x{chosen[1]}", lambda: _train_case(preset, device, *chosen, True, steps))
        out["cases"].append(case)
        eager = out["cases"][-2]
        if "error" not in case:
            out["compiled_over_eager"] = round(case["tokens_per_s"] / eager["tokens_per_s"], 3)
    return out


# --------------------------------------------------------------------------- extract


def bench_extract(preset: str, device: str, audio_seconds: float) -> dict:
    import numpy as np
    import torch

    from bench.extract import make_audio
    from fish_speech_core.codec import init_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fish_speech_core.codec.extract import ExtractSettings, encode_batches, plan_extraction

    model = init_codec(FireflyConfig.from_name(preset), seed=0).to(device)
    out: dict = {"preset": preset, "audio_seconds_requested": audio_seconds}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        paths = make_audio(Path(tmp), audio_seconds, seed=0)
        codes: dict[str, dict] = {}
        for dtype in ("fp32", "bf16"):
            def run(dtype=dtype) -> dict:
                _reset_memory(device)
                settings = ExtractSettings(batch_size=16, num_workers=2, dtype=dtype, overwrite=True)
                plan = plan_extraction(paths, model, settings)
                audio = sum(job.seconds for job in plan.todo)
                got = {}
                started = time.perf_counter()
                for job, array, _, error in encode_batches(model, plan.todo, settings):
                    if array is None:
                        raise RuntimeError(f"{job.audio_path.name}: {error}")
                    got[str(job.audio_path)] = array
                _sync(device)
                elapsed = time.perf_counter() - started
                codes[dtype] = got
                return {"files": len(got), "audio_seconds": round(audio, 1),
                        "audio_s_per_s": round(audio / elapsed, 1), "peak_mib": _peak_mib(device)}

            out[dtype] = _guarded(f"extract {dtype}", run)
        if "fp32" in codes and "bf16" in codes:
            equal = sum(int(np.sum(codes["fp32"][k] == codes["bf16"][k])) for k in codes["fp32"])
            total = sum(codes["fp32"][k].size for k in codes["fp32"])
            out["bf16_codes_equal_to_fp32"] = round(equal / total, 4)
            out["bf16_over_fp32"] = round(out["bf16"]["audio_s_per_s"] / out["fp32"]["audio_s_per_s"], 3)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- generate


def bench_generate(preset: str, device: str, new_tokens: int, compile_too: bool) -> dict:
    import torch

    from bench.synthesize import make_prompt
    from fish_speech_core.lm import generate as gen

    model, config = _lm(preset, device)
    model.eval()
    if device == "cuda":
        model.to(torch.bfloat16)
    prompt = make_prompt(config, torch.Generator().manual_seed(1)).to(device)
    settings = gen.SamplingSettings()
    out: dict = {"preset": preset, "dtype": "bf16" if device == "cuda" else "fp32", "prompt": prompt.size(1)}

    def run(compiled: bool) -> dict:
        originals = gen.slow_step, gen.fast_step
        if compiled:
            gen.slow_step = torch.compile(originals[0], dynamic=True)
            gen.fast_step = torch.compile(originals[1], dynamic=True)
        try:
            _reset_memory(device)
            started = time.perf_counter()
            gen.generate(model, prompt, -1, 8, settings, torch.Generator(device=device).manual_seed(0))  # warm-up
            _sync(device)
            warmup_s = time.perf_counter() - started
            result = gen.generate(model, prompt, -1, new_tokens, settings, torch.Generator(device=device).manual_seed(0))
            _sync(device)
        finally:
            gen.slow_step, gen.fast_step = originals
        return {"compiled": compiled, "new_tokens": result.new_tokens, "tokens_per_s": round(result.tokens_per_second, 1),
                "warmup_s": round(warmup_s, 1), "peak_mib": _peak_mib(device)}

    out["eager"] = _guarded("generate eager", lambda: run(False))
    if compile_too:
        out["compiled"] = _guarded("generate compiled", lambda: run(True))
        if "error" not in out["compiled"] and "error" not in out["eager"]:
            out["compiled_over_eager"] = round(out["compiled"]["tokens_per_s"] / out["eager"]["tokens_per_s"], 3)
    del model
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny models on the CPU, no compile: seconds.")
    parser.add_argument("--json", type=Path, help="Write the figures here (default: print only).")
    parser.add_argument("--no-compile", action="store_true", help="Skip the torch.compile cases.")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--extract-seconds", type=float, default=300.0, help="Synthetic audio for extraction.")
    parser.add_argument("--new-tokens", type=int, default=200)
    args = parser.parse_args(argv)

    import torch

    from fish_speech_core.files import atomic_write

    if args.smoke:
        device, lm_preset, codec_preset, shapes = "cpu", "tiny", "tiny", SMOKE_SHAPES
        steps, seconds, new_tokens, compile_too = 1, 6.0, 8, False
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py: no CUDA device here; run it on a GPU machine, or use --smoke", file=sys.stderr)
            return 2
        device, lm_preset, codec_preset, shapes = "cuda", "fish-speech-1.4", "fish-speech-1.4", TRAIN_SHAPES
        steps, seconds, new_tokens, compile_too = args.train_steps, args.extract_seconds, args.new_tokens, not args.no_compile
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 extraction stays fp32 (parity with the reference)
    started = time.perf_counter()
    figures = {
        "bench": "gpu", "smoke": args.smoke, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"bench/gpu.py on {figures['device']} (torch {figures['torch']})", flush=True)
    figures["train"] = bench_train(lm_preset, device, shapes, steps, compile_too)
    figures["extract"] = bench_extract(codec_preset, device, seconds)
    figures["generate"] = bench_generate(lm_preset, device, new_tokens, compile_too)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(figures, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.json, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
