"""The reference's side of bench/compare.py: Fish Speech 1.4.3's own modules, timed like ours.

Run with the reference's interpreter (its own venv; docs/performance.md, "Measuring against the
reference"), from the repo root or anywhere:

    /work/ref/.venv/bin/python bench/reference.py train --steps 2 --json out.json
    /work/ref/.venv/bin/python bench/reference.py extract DATA --batch-size 16 --json out.json

This file imports neither fishtune nor fish_speech_core (they live in another venv); it imports
the reference's ``fish_speech`` package and calls it, and shares only dependency-free helpers
with our side (``bench.forward.make_batch``: the same random batch; ``bench.extract.cpu_seconds``:
the same CPU clock).

* train: the reference's DualARTransformer (random init, gradient checkpointing on, as its
  training config has it), LoRA by its ``setup_lora`` (r 8, alpha 16, dropout 0.01), the loss of
  its ``TextToSemantic.training_step`` (token CE + codebook CE, and the top-5 accuracy it computes
  there), clip 1.0, AdamW on the adapters; fp32 CPU. One warm-up step, then ``--steps`` timed ones,
  measured as ``bench/train.py:run_case`` measures ours.
* extract: the reference's FireflyArchitecture built from its ``firefly_gan_vq.yaml`` (random init,
  real size) in eval mode, batched as its ``tools/vqgan/extract_vq.py`` batches (files in order,
  ``--batch-size`` at a time, each padded to the longest), audio read with soundfile (torchaudio
  2.11's ``load`` needs torchcodec) and resampled with ``torchaudio.functional.resample``. The timed
  loop is decode + resample + encode + codes to numpy, after the model is loaded and warmed up;
  codes are not written to disk (ours are not either in ``bench/extract.py:loop_vs_encoder``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.forward / bench.extract: plain helpers, no fishtune import

# Our "mid" and "tiny" presets (fish_speech_core/lm/config.py), in the reference's argument names.
SHAPES = {
    "tiny": dict(vocab_size=904, dim=64, n_layer=2, n_head=4, n_local_heads=2, n_fast_layer=1, max_seq_len=512),
    "mid": dict(vocab_size=32000, dim=512, n_layer=8, n_head=8, n_local_heads=2, n_fast_layer=4, max_seq_len=2048),
}
COMMON = dict(codebook_size=1024, num_codebooks=8, rope_base=1e6, norm_eps=1e-6, tie_word_embeddings=False)
BATCH = {"tiny": (4, 256), "mid": (2, 1024)}  # as bench/train.py's SHAPES
SEMANTIC_ID = 5  # <|semantic|>'s id in our bench batches (bench/train.py builds ours with 5 too)


def _tokenizer():
    """A real (tiny) fast tokenizer whose <|semantic|> is SEMANTIC_ID: all the model asks of one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from fish_speech.conversation import SEMANTIC_TOKEN

    vocab = {f"<unused{i}>": i for i in range(SEMANTIC_ID)} | {SEMANTIC_TOKEN: SEMANTIC_ID}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unused0>")))


def train(preset: str, steps: int, threads: int) -> dict:
    import torch

    from bench.forward import make_batch
    from fish_speech.models.text2semantic.lit_module import TextToSemantic
    from fish_speech.models.text2semantic.llama import DualARModelArgs, DualARTransformer
    from fish_speech.models.text2semantic.lora import LoraConfig, setup_lora

    # TextToSemantic.training_step calls self.log, which without a Trainer only warns.
    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = DualARModelArgs(**SHAPES[preset], **COMMON, use_gradient_checkpointing=True)
    model = DualARTransformer(config, tokenizer=_tokenizer())
    base_params = sum(p.numel() for p in model.parameters())
    setup_lora(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.01))
    module = TextToSemantic(model, optimizer=None, lr_scheduler=None)  # builders unused: no Trainer
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    batch, seq_len = BATCH[preset]
    inputs, labels, padding = make_batch(batch, seq_len, config.vocab_size, SEMANTIC_ID, torch.Generator().manual_seed(0))
    data = {"inputs": inputs, "labels": labels, "attention_masks": padding}  # the reference collate's keys

    def step() -> float:  # what Lightning's automatic optimisation does around training_step
        loss = module.training_step(data, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    built_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first_loss = step()  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "stage": "train", "preset": preset, "steps": steps, "threads": threads,
        "shape": f"{batch}x{seq_len}",
        "tokens_per_s": steps * batch * seq_len / elapsed,
        "s_per_step": elapsed / steps,
        "cpu_s_per_step": cpu / steps,  # time.process_time: user+sys of all threads, as bench/train.py
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_built_mib": built_mib,  # peak before the first step: imports, model, batch
        "params": base_params, "lora_params": sum(p.numel() for p in params),
        "first_loss": first_loss, **_versions(),
    }


def _read(path: Path, rate: int):
    """One file as extract_vq.py's process_batch prepares it: mono, resampled, 1-D."""
    import soundfile
    import torch
    import torchaudio.functional as AF

    audio, sr = soundfile.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    wav = torch.from_numpy(audio.T.copy())
    if wav.shape[0] > 1:
        wav = wav.mean(dim=0, keepdim=True)
    return AF.resample(wav, sr, rate)[0]


def _encode_batch(model, paths: list[Path]) -> tuple[dict, float]:
    import torch

    rate = model.spec_transform.sample_rate
    wavs = [_read(p, rate) for p in paths]
    lengths = [len(w) for w in wavs]
    longest = max(lengths)
    audios = torch.stack([torch.nn.functional.pad(w, (0, longest - len(w))) for w in wavs])[:, None]
    indices, feature_lengths = model.encode(audios, torch.tensor(lengths, dtype=torch.long))
    outputs = indices.cpu().numpy()
    codes = {p.stem: out[:, :n] for p, out, n in zip(paths, outputs, feature_lengths.tolist(), strict=True)}
    return codes, sum(lengths) / rate


def extract(folder: Path, batch_size: int, repeats: int, threads: int) -> dict:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bench.extract import cpu_seconds

    if threads:
        torch.set_num_threads(threads)
    paths = sorted(folder.glob("*.wav"))
    if not paths:
        raise SystemExit(f"no .wav files in {folder}")
    torch.manual_seed(0)
    config = OmegaConf.load(_package_dir() / "configs" / "firefly_gan_vq.yaml")
    model = instantiate(config).eval()
    with torch.inference_mode():  # warm-up, as ours: first calls allocate and pick kernels
        model.encode(torch.zeros(1, 1, 44100), torch.tensor([44100]))
    best = {"audio_s_per_s": 0.0, "audio_s_per_cpu_s": 0.0}
    for _ in range(repeats):
        cpu_start, start = cpu_seconds(), time.perf_counter()
        with torch.inference_mode():
            codes, audio_seconds = {}, 0.0
            for i in range(0, len(paths), batch_size):
                batch_codes, seconds = _encode_batch(model, paths[i:i + batch_size])
                codes |= batch_codes
                audio_seconds += seconds
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        best = {"audio_s_per_s": max(best["audio_s_per_s"], audio_seconds / wall),
                "audio_s_per_cpu_s": max(best["audio_s_per_cpu_s"], audio_seconds / cpu),
                "wall_s": min(best.get("wall_s", wall), wall), "cpu_s": min(best.get("cpu_s", cpu), cpu)}
    return {
        "stage": "extract", "clips": len(paths), "audio_seconds": round(audio_seconds, 1),
        "batch_size": batch_size, "repeats": repeats, "threads": torch.get_num_threads(),
        **{k: round(v, 2) for k, v in best.items()},
        "frames": sum(c.shape[-1] for c in codes.values()),  # the codes' length in all, to set beside ours
        "model_params": sum(p.numel() for p in model.parameters()),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **_versions(),
    }


def _package_dir() -> Path:
    """The reference's ``fish_speech`` folder (a namespace package: it has no ``__init__.py``)."""
    import fish_speech

    return Path(next(iter(fish_speech.__path__)))


def _versions() -> dict:
    import torch

    return {"torch": torch.__version__, "fish_speech": str(_package_dir())}


def _write_json(path: Path, figures: dict) -> None:
    """Atomic: a temporary file beside ``path``, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(figures, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("train", help="the reference's LoRA training step")
    t.add_argument("--preset", choices=sorted(SHAPES), default="mid")
    t.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    t.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    t.add_argument("--json", type=Path)
    e = sub.add_parser("extract", help="the reference's Firefly encoder over a folder of .wav")
    e.add_argument("data", type=Path)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--repeats", type=int, default=1, help="sweeps over the folder; the best counts")
    e.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    e.add_argument("--json", type=Path)
    args = parser.parse_args()
    if importlib.util.find_spec("fish_speech") is None:
        raise SystemExit("bench/reference.py: no fish_speech (Fish Speech 1.4.3) in this interpreter; run it with "
                         "the reference venv's python (docs/performance.md, 'Measuring against the reference')")
    if args.stage == "train":
        r = train(args.preset, args.steps, args.threads)
        print(f"reference train {r['preset']} {r['shape']}: {r['tokens_per_s']:.0f} tokens/s, {r['s_per_step']:.2f} s/step, "
              f"{r['cpu_s_per_step']:.2f} CPU s/step, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(built {r['rss_built_mib']:.0f}); load average {os.getloadavg()[0]:.2f}", flush=True)
    else:
        r = extract(args.data, args.batch_size, args.repeats, args.threads)
        print(f"reference extract batch {r['batch_size']}: {r['audio_s_per_s']:.1f} audio-s/s "
              f"({r['audio_s_per_cpu_s']:.1f} per CPU-s) on {r['clips']} clips / {r['audio_seconds']:.0f} s, "
              f"peak RSS {r['peak_rss_mib']} MiB; load average {os.getloadavg()[0]:.2f}", flush=True)
    r["load_average_1min"] = round(os.getloadavg()[0], 2)
    if args.json:
        _write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
