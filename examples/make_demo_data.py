"""Regenerate examples/demo-data: three synthetic speakers spoken by espeak-ng.

Needs Debian's espeak-ng and sox (`apt-get install espeak-ng sox`). The output is committed,
so users never run this; it exists so the data can be remade or changed on purpose.

    python examples/make_demo_data.py [--output examples/demo-data]

Layout: one folder per speaker, `<stem>.<wav|flac|mp3>` + `<stem>.lab`, mixing formats,
sample rates (16 / 22.05 / 44.1 kHz) and one stereo file, as real user data does.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import soundfile

SPEAKERS = {
    # folder: (espeak-ng voice, sentences)
    "alice": (
        "en-us+f3",
        [
            "The morning train was late again today.",
            "Please put the blue book back on the shelf.",
            "We walked along the river until the sun went down.",
            "Coffee tastes better when somebody else makes it.",
            "The meeting starts at nine, so do not be late.",
            "My sister plays the violin in a small orchestra.",
            "It rained all weekend, and the garden loved it.",
            "Could you send me the report before lunch?",
            "A quiet room helps me think.",
            "The old bridge was painted bright red last spring.",
        ],
    ),
    "bruno": (
        "es+m3",
        [
            "El tren de la mañana llegó tarde otra vez.",
            "Mañana vamos a visitar a mis abuelos en el pueblo.",
            "La biblioteca cierra a las ocho de la tarde.",
            "Me gusta caminar por la playa cuando hace frío.",
            "¿Dónde está la estación de autobuses más cercana?",
            "Mi hermano cocina una paella excelente los domingos.",
            "El perro del vecino ladra toda la noche.",
            "Necesito comprar pan, leche y un poco de fruta.",
            "Hoy hace un día precioso para leer en el parque.",
            "La reunión empieza a las nueve en punto.",
        ],
    ),
    "carmen": (
        "es-419+f2",
        [
            "Buenos días, ¿cómo amaneciste hoy?",
            "El café de esta tienda es muy bueno.",
            "Vamos al cine el viernes por la noche.",
            "Las flores del jardín ya están abiertas.",
            "Escribe tu nombre en la primera página.",
            "Los niños juegan en la plaza después de clase.",
            "Ayer llovió durante toda la tarde.",
            "Por favor, cierra la ventana antes de salir.",
        ],
    ),
}

# (container, sample rate), cycled per clip so every speaker mixes formats and rates.
LAYOUTS = [("wav", 16000), ("flac", 22050), ("mp3", 44100), ("flac", 44100), ("wav", 22050), ("mp3", 22050)]
STEREO = ("alice", 3)  # one stereo file in the set


def speak(voice: str, text: str, rate: int, stereo: bool, out: Path, work: Path) -> None:
    raw = work / "raw.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(raw), text], check=True)
    shaped = work / "shaped.wav"
    # -R: repeatable; -D: no dither, so reruns give identical bytes. Trim leading/trailing silence a bit.
    effects = ["silence", "1", "0.05", "0.5%", "reverse", "silence", "1", "0.05", "0.5%", "reverse", "pad", "0.15", "0.2"]
    if stereo:
        effects += ["remix", "1", "1"]
    subprocess.run(["sox", "-R", "-D", str(raw), "-r", str(rate), str(shaped), *effects], check=True)
    data, sr = soundfile.read(shaped, dtype="int16")
    if stereo:  # make the channels differ a little, like a real stereo recording
        data[:, 1] = (data[:, 1] * 0.8).astype("int16")
    fmt = out.suffix[1:].upper()
    subtype = "MPEG_LAYER_III" if fmt == "MP3" else "PCM_16"
    soundfile.write(out, data, sr, format=fmt, subtype=subtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "demo-data")
    args = parser.parse_args()
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install espeak-ng sox")
    if args.output.exists():
        shutil.rmtree(args.output)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for speaker, (voice, sentences) in SPEAKERS.items():
            folder = args.output / speaker
            folder.mkdir(parents=True)
            for index, text in enumerate(sentences):
                container, rate = LAYOUTS[(index + len(speaker)) % len(LAYOUTS)]
                stem = f"{speaker}_{index:03d}"
                speak(voice, text, rate, (speaker, index) == STEREO, folder / f"{stem}.{container}", work)
                (folder / f"{stem}.lab").write_text(text + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in args.output.rglob("*") if p.is_file())
    print(f"wrote {args.output} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
