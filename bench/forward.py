"""Forward+backward throughput and peak memory of the dual-AR model on CPU: SDPA vs explicit softmax.

    python -m bench.forward [--presets tiny mid] [--steps 3] [--threads 2]   # from the repo root

Each (preset, attention) case runs in a fresh process so its peak RSS is its own. Batches look
like training samples: a text prompt, then <|semantic|> steps carrying 8 codes, right padding.
Reported: tokens/s (batch * seq_len per forward+backward step, after one warm-up step), the
process's peak RSS, and "step peak": how far the steps raised it above the RSS with the model
and batch built (activations, gradients, attention scratch).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# (batch, seq_len) per preset; mid uses the longer sequences training sees.
SHAPES = {"tiny": (4, 256), "mid": (1, 512)}


def make_batch(batch: int, seq_len: int, vocab: int, semantic_id: int, generator):
    import torch

    inputs = torch.zeros(batch, 9, seq_len, dtype=torch.long)
    labels = torch.full((batch, 9, seq_len), -100, dtype=torch.long)
    padding = torch.zeros(batch, seq_len, dtype=torch.bool)
    prompt = seq_len // 8
    for b in range(batch):
        length = seq_len - b * (seq_len // 8)  # ragged lengths, padded on the right
        inputs[b, 0, :prompt] = torch.randint(10, vocab, (prompt,), generator=generator)
        inputs[b, 0, prompt:length] = semantic_id
        inputs[b, 1:, prompt:length - 1] = torch.randint(1, 1001, (8, length - 1 - prompt), generator=generator)
        labels[b, :, : length - 1] = inputs[b, :, 1:length]
        labels[b, 1:, : prompt - 1] = -100
        padding[b, length:] = True
    return inputs, labels, padding


def run_case(preset: str, impl: str, steps: int, threads: int) -> dict:
    import torch

    from fish_speech_core.lm import PRESETS, DualARTransformer, init_weights, lm_losses

    torch.set_num_threads(threads)
    config = PRESETS[preset]
    with torch.device("meta"):
        model = DualARTransformer(config, semantic_token_id=5, attention_impl=impl)
    model.to_empty(device="cpu")
    model.reset_buffers("cpu")
    init_weights(model, torch.Generator().manual_seed(0))
    model.train()
    batch, seq_len = SHAPES[preset]
    inputs, labels, padding = make_batch(batch, seq_len, config.vocab_size, 5, torch.Generator().manual_seed(0))

    def step() -> float:
        out = model(inputs, padding)
        loss = lm_losses(out.token_logits, out.codebook_logits, labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # model + batch built
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "preset": preset,
        "impl": impl,
        "params": sum(p.numel() for p in model.parameters()),
        "shape": f"{batch}x{seq_len}",
        "tokens_per_s": steps * batch * seq_len / elapsed,
        "peak_rss_mib": rss_peak / 1024,
        "step_peak_mib": (rss_peak - rss_before) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"], choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="timed forward+backward steps")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    figures: dict = {"stage": "forward", "threads": args.threads, "presets": {}}
    print(f"{'preset':<6} {'attention':<9} {'params':>12} {'BxT':>7} {'tokens/s':>10} "
          f"{'peak RSS MiB':>13} {'step peak MiB':>14}")
    for preset in args.presets:
        results = {}
        for impl in ("sdpa", "explicit"):
            # A fresh process per case, so ru_maxrss is this case's peak alone.
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                r = pool.submit(run_case, preset, impl, args.steps, args.threads).result()
            results[impl] = r
            print(f"{preset:<6} {impl:<9} {r['params']:>12,} {r['shape']:>7} {r['tokens_per_s']:>10.0f} "
                  f"{r['peak_rss_mib']:>13.0f} {r['step_peak_mib']:>14.0f}")
        s, e = results["sdpa"], results["explicit"]
        print(f"{preset:<6} sdpa/explicit: speed x{s['tokens_per_s'] / e['tokens_per_s']:.2f}, "
              f"peak RSS x{s['peak_rss_mib'] / e['peak_rss_mib']:.2f}")
        figures["presets"][preset] = {**results, "sdpa_over_explicit_speed": s["tokens_per_s"] / e["tokens_per_s"]}
    if args.json:
        from fish_speech_core.files import atomic_write

        with atomic_write(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
