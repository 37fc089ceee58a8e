"""LoRA training-step throughput on CPU: our settings vs reference-like settings.

    python -m bench.train [--quick] [--presets tiny mid] [--steps 2] [--threads 2]   # repo root

"ours": SDPA attention, gradient checkpointing off, glibc's mmap threshold fixed as training
fixes it ("ours, glibc default", with --cases, leaves glibc's dynamic rule). "reference-like": gradient checkpointing on
and a materialised (explicit) softmax attention, as Fish Speech 1.4 trains (our model applies
the attention choice to slow and fast layers alike). Each case is a full LoRA step (r 8,
alpha 16: forward, backward, clip 1.0, AdamW on the adapters) in a fresh process, so the peak
RSS is its own. Shapes: tiny 4x256; mid (dim 512, 8 + 4 layers, vocab 32000) 2x1024, the
shape of the reference measurement in shared/notes (174 tokens/s, 11.8 s/step, 3.3 GB).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/train.py` and its pool workers
import fishtune  # noqa: E402,F401 - the environment every fishtune process trains with (huge pages), before torch

SHAPES = {"tiny": (4, 256), "mid": (2, 1024)}
# case: (attention, gradient checkpointing, fix glibc's mmap threshold as `fishtune train` does)
CASES = {"ours": ("sdpa", False, True), "ours, glibc default": ("sdpa", False, False),
         "reference-like": ("explicit", True, False)}
# Not in this script's own sweep: bench/compare.py also times our default with checkpointing on.
EXTRA_CASES = {"ours+checkpointing": ("sdpa", True, True)}


def build_lora_step(preset: str, checkpointing: bool, batch: int, seq_len: int, attention_impl: str = "sdpa",
                    threads: int = 0):
    """A random-init LM of ``preset`` with LoRA (r 8, dropout 0.01), its AdamW, and one batch.

    Returns ``(model, params, optimizer, (inputs, labels, padding))``; shared with bench/memory.py.
    """
    import torch

    from bench.forward import make_batch
    from fish_speech_core.finetune.lora import LoraSettings, add_lora, lora_parameters
    from fish_speech_core.lm import PRESETS, DualARTransformer, init_weights

    if threads:
        torch.set_num_threads(threads)
    config = replace(PRESETS[preset], use_gradient_checkpointing=checkpointing)
    with torch.device("meta"):
        model = DualARTransformer(config, semantic_token_id=5, attention_impl=attention_impl)
    model.to_empty(device="cpu")
    model.reset_buffers("cpu")
    init_weights(model, torch.Generator().manual_seed(0))
    add_lora(model, LoraSettings(dropout=0.01)).train()
    params = [p for _, p in lora_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    data = make_batch(batch, seq_len, config.vocab_size, 5, torch.Generator().manual_seed(0))
    return model, params, optimizer, data


def run_case(preset: str, case: str, steps: int, threads: int) -> dict:
    import torch

    from fish_speech_core.lm import lm_losses
    from fish_speech_core.lm.loss import training_loss_sums

    from fish_speech_core.allocator import release_freed_memory

    impl, checkpointing, allocator = {**CASES, **EXTRA_CASES}[case]
    if allocator:
        release_freed_memory()
    batch, seq_len = SHAPES[preset]
    model, params, optimizer, (inputs, labels, padding) = build_lora_step(
        preset, checkpointing, batch, seq_len, impl, threads)

    def loss():  # as fishtune's training_step computes it; the reference-like case as the reference does
        if impl == "sdpa":
            return training_loss_sums(model, inputs, padding, labels).loss()
        out = model(inputs, padding)
        return lm_losses(out.token_logits, out.codebook_logits, labels, logits_are_scratch=True).loss

    def step() -> None:
        loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "shape": f"{batch}x{seq_len}",
        "tokens_per_s": steps * batch * seq_len / elapsed,
        "s_per_step": elapsed / steps,
        "cpu_s_per_step": cpu / steps,  # user+sys of all threads: steadier than wall time on a shared machine
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"], choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per case")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny only, 2 steps (seconds)")
    parser.add_argument("--cases", nargs="+", default=["ours", "reference-like"], choices=list(CASES),
                        help="'ours, glibc default' isolates the allocator setting (docs/performance.md)")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args()
    presets = ["tiny"] if args.quick else args.presets

    context = multiprocessing.get_context("spawn")
    figures: dict = {"stage": "train", "threads": args.threads, "steps": args.steps, "presets": {}}
    print(f"{'preset':<6} {'case':<20} {'BxT':>7} {'tokens/s':>10} {'s/step':>8} {'cpu s/step':>10} {'peak RSS MiB':>13}")
    for preset in presets:
        results = {}
        for case in args.cases:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                r = pool.submit(run_case, preset, case, args.steps, args.threads).result()
            results[case] = r
            print(f"{preset:<6} {case:<20} {r['shape']:>7} {r['tokens_per_s']:>10.0f} "
                  f"{r['s_per_step']:>8.2f} {r['cpu_s_per_step']:>10.2f} {r['peak_rss_mib']:>13.0f}", flush=True)
        if "ours" not in results or "reference-like" not in results:
            figures["presets"][preset] = results
            continue
        o, ref = results["ours"], results["reference-like"]
        print(f"{preset:<6} ours/reference-like: speed x{o['tokens_per_s'] / ref['tokens_per_s']:.2f}, "
              f"peak RSS x{o['peak_rss_mib'] / ref['peak_rss_mib']:.2f}")
        figures["presets"][preset] = {**results, "ours_over_reference_like_speed": o["tokens_per_s"] / ref["tokens_per_s"]}
    if args.json:
        from fish_speech_core.files import atomic_write

        with atomic_write(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
