"""Synthesis speed on CPU: generation tokens/s with vs without the slow KV cache, and the
real-time factor of codec decoding.

    python -m bench.synthesize [--quick] [--presets tiny mid] [--threads 1]   # from the repo root

Generation: random-weight models of each preset (``init_weights``), a prompt like a voice
clone (a ~40-token text turn + a 100-frame reference clip + the target text turn), then
``--new-tokens`` columns with ``generate`` (slow KV cache) and ``generate_uncached`` (the slow
transformer re-run over the whole sequence at every step). ``<|im_end|>`` is disabled so both
produce exactly the same number of columns. One thread by default: on a shared 2-core machine
SDPA with 2 threads spends most of its time waiting for the other thread.

Decode: the real-size Firefly preset with random weights decodes ``--audio-seconds`` of random
codes; RTF = wall seconds / audio seconds (< 1 is faster than real time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def make_prompt(config, generator):
    import torch

    k = config.num_codebooks
    prompt = torch.zeros(1 + k, 190, dtype=torch.int32)
    prompt[0] = torch.randint(10, config.vocab_size, (190,), generator=generator, dtype=torch.int32)
    prompt[0, 40:140] = 5  # <|semantic|> under the reference clip's codes
    prompt[1:, 40:140] = torch.randint(1, 1001, (k, 100), generator=generator, dtype=torch.int32)
    return prompt


def bench_generation(preset: str, new_tokens: int) -> dict:
    import torch

    from fish_speech_core.lm import PRESETS, DualARTransformer, init_weights
    from fish_speech_core.lm.generate import SamplingSettings, generate, generate_uncached

    config = PRESETS[preset]
    with torch.device("meta"):
        model = DualARTransformer(config, semantic_token_id=5)
    model.to_empty(device="cpu")
    model.reset_buffers("cpu")
    init_weights(model, torch.Generator().manual_seed(0))
    model.eval()
    prompt = make_prompt(config, torch.Generator().manual_seed(1))
    settings = SamplingSettings()
    generate(model, prompt, -1, 2, settings, torch.Generator().manual_seed(0))  # warm-up
    cached = generate(model, prompt, -1, new_tokens, settings, torch.Generator().manual_seed(0))
    uncached = generate_uncached(model, prompt, -1, new_tokens, settings, torch.Generator().manual_seed(0))
    return {
        "preset": preset,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "prompt": prompt.size(1),
        "new_tokens": cached.new_tokens,
        "cached_tps": cached.tokens_per_second,
        "uncached_tps": uncached.tokens_per_second,
        "same_tokens": bool(torch.equal(cached.sequence, uncached.sequence)),
    }


def bench_decode(audio_seconds: float) -> dict:
    import torch

    from fish_speech_core.codec import init_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fish_speech_core.codec.decode import decode

    codec = init_codec(FireflyConfig.from_name("fish-speech-1.4"), seed=0).eval()
    frames = max(1, round(audio_seconds * codec.sample_rate / codec.config.samples_per_code))
    codes = torch.randint(0, 1000, (1, codec.config.num_codebooks, frames), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decode(codec, codes[..., :4])  # warm-up
        started = time.perf_counter()
        audio, _ = decode(codec, codes)
        elapsed = time.perf_counter() - started
    seconds = audio.size(-1) / codec.sample_rate
    return {"audio_seconds": seconds, "wall_seconds": elapsed, "rtf": elapsed / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer tokens and shorter audio.")
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"], help="LM presets.")
    parser.add_argument("--new-tokens", type=int, default=None, help="Default 64 (quick: 16).")
    parser.add_argument("--audio-seconds", type=float, default=None, help="Default 10 (quick: 2).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    audio_seconds = args.audio_seconds or (2.0 if args.quick else 10.0)
    print(f"CPU, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'preset':8} {'params':>8} {'prompt':>6} {'new':>4} {'cached tok/s':>13} "
          f"{'no-cache tok/s':>15} {'ratio':>6} same-tokens")
    figures: dict = {"stage": "synthesize", "threads": args.threads, "generation": []}
    for preset in args.presets:
        r = bench_generation(preset, new_tokens)
        figures["generation"].append({**r, "cached_over_uncached": r["cached_tps"] / r["uncached_tps"]})
        print(f"{r['preset']:8} {r['params_m']:7.1f}M {r['prompt']:6d} {r['new_tokens']:4d} "
              f"{r['cached_tps']:13.1f} {r['uncached_tps']:15.1f} "
              f"{r['cached_tps'] / r['uncached_tps']:6.2f} {r['same_tokens']}")
    d = bench_decode(audio_seconds)
    print(f"decode fish-speech-1.4 codec: {d['audio_seconds']:.2f} s audio in "
          f"{d['wall_seconds']:.2f} s, RTF {d['rtf']:.3f}")
    figures["decode"] = d
    if args.json:
        from fish_speech_core.files import atomic_write

        with atomic_write(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
