"""Transcription speed: mlxpool's server against a direct mlx-audio call on the same file and model, in one run.

    python bench/asr.py --model models/whisper-tiny.en                 # speech made now with espeak-ng
    python bench/asr.py --model DIR --audio speech.wav --clients 8

Real-time factor (RTF) = seconds of audio transcribed per second of wall time, for: mlx-audio's
`Model.generate` called directly (the audio already decoded), one request through the server (upload, PyAV
decode, a window per worker step, JSON), and `--clients` concurrent requests (aggregate). Greedy (temperature 0)
everywhere; each timing is the best of `--repeats` after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import output
from chat import free_port, wait_up

TEXT = (
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
    "A journey of a thousand miles begins with a single step. All that glitters is not gold. "
)


def speech(seconds: float, workdir: Path) -> bytes:
    """About `seconds` of espeak-ng speech, as a wav file."""
    if not shutil.which("espeak-ng"):
        raise SystemExit("espeak-ng is missing: give --audio FILE")
    words_per_second = 150 / 60
    repeats = max(1, round(seconds * words_per_second / len(TEXT.split())))
    path = workdir / "speech.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), TEXT * repeats], check=True)
    return path.read_bytes()


def direct(model_path: Path, data: bytes, repeats: int) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_audio.stt import load

    from mlxpool.api.audio_io import decode_audio_or_raise
    from mlxpool.engines.whisper import float32_whisper, is_whisper

    model = load(str(model_path))
    if mx.default_device() == mx.cpu and is_whisper(model):
        float32_whisper(model)  # what the server does on CPU
    audio = decode_audio_or_raise(data, 16000)
    seconds = len(audio) / 16000
    fp16 = model.dtype == mx.float16 if is_whisper(model) else None
    options = {"temperature": 0.0, **({"fp16": fp16} if fp16 is not None else {})}
    model.generate(audio, **options)  # warm-up
    best = min(_timed(lambda: model.generate(audio, **options)) for _ in range(repeats))
    text = model.generate(audio, **options).text
    return {"audio_seconds": seconds, "wall_seconds": best, "rtf": seconds / best, "text": text}


def _timed(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


async def through_server(port: int, data: bytes, clients: int, repeats: int, seconds: float) -> dict[str, Any]:
    form = {"model": "bench", "temperature": "0", "language": "en"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600) as client:

        async def one() -> str:
            response = await client.post("/v1/audio/transcriptions", data=form, files={"file": ("a.wav", data)})
            response.raise_for_status()
            return str(response.json()["text"])

        text = await one()  # warm-up
        single = min([await _timed_async(one) for _ in range(repeats)])
        start = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(clients)), return_exceptions=True)
        concurrent = time.perf_counter() - start
    failed = sum(isinstance(r, BaseException) for r in results)
    return {
        "wall_seconds": single,
        "rtf": seconds / single,
        "text": text,
        "concurrent": {"clients": clients, "wall_seconds": concurrent, "aggregate_rtf": clients * seconds / concurrent,
                       "failed": failed},
    }  # fmt: skip


async def _timed_async(run: Any) -> float:
    start = time.perf_counter()
    await run()
    return time.perf_counter() - start


def start_server(model_path: Path, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    config = workdir / "bench.toml"
    config.write_text(
        f'[server]\nports = [{port}]\nlog_level = "warning"\nmax_request_bytes = "1GB"\n'
        f'[models.bench]\nkind = "asr"\npath = "{model_path}"\npreload = true\n'
    )
    process = subprocess.Popen([sys.executable, "-m", "mlxpool", "serve", "--config", str(config)])
    wait_up(f"http://127.0.0.1:{port}", process, "/health/ready")
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--audio", type=Path)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = args.audio.read_bytes() if args.audio else speech(args.seconds, workdir)
        result: dict[str, Any] = {"model": str(args.model), "direct": direct(args.model.resolve(), data, args.repeats)}
        seconds = result["direct"]["audio_seconds"]
        port = free_port()
        process = start_server(args.model.resolve(), port, workdir)
        try:
            result["server"] = asyncio.run(through_server(port, data, args.clients, args.repeats, seconds))
        finally:
            process.terminate()
            process.wait(timeout=60)
    result["server_over_direct"] = result["server"]["rtf"] / result["direct"]["rtf"]
    output.report(result, args.out)
    server, concurrent = result["server"], result["server"]["concurrent"]
    print(
        f"\naudio {seconds:.1f} s: direct RTF {result['direct']['rtf']:.1f}, server RTF {server['rtf']:.1f} "
        f"({result['server_over_direct']:.2f}x); {concurrent['clients']} concurrent: aggregate RTF "
        f"{concurrent['aggregate_rtf']:.1f}, failed {concurrent['failed']}"
    )


if __name__ == "__main__":
    main()
