"""Profile the server under a chat load: py-spy samples the server process while `clients` streams run.

    python bench/profile_chat.py --shape qwen3-0.6b --clients 64 --py-spy PATH/TO/py-spy --out prof.txt
Writes py-spy's raw (collapsed) stacks; the summary printed last is the time share per thread and top frames.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import tempfile
from pathlib import Path

import chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--py-spy", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = chat.build_model(args.shape, workdir)
        vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
        texts = chat.prompts(args.clients, 128, None if args.shape == "tiny" else vocab)
        port = chat.free_port()
        server = chat.start_mlxpool(path, port, workdir)
        try:
            asyncio.run(chat.load_test(port, "bench", texts, args.clients, 128, 1))
            gil = ["--gil"] if args.gil else []
            spy = subprocess.Popen([args.py_spy, "record", "-p", str(server.pid), "-d", "12", "-r", "100", "-f", "raw",
                                    "--threads", "--nonblocking", *gil, "-o", str(args.out)])  # fmt: skip
            for _ in range(4):
                print(asyncio.run(chat.load_test(port, "bench", texts, args.clients, 128, 0)))
            spy.wait(timeout=120)
        finally:
            server.terminate()
            server.wait(timeout=60)
    summarize(args.out)


def summarize(path: Path) -> None:
    threads: collections.Counter[str] = collections.Counter()
    frames: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        parts = stack.split(";")
        threads[parts[0]] += int(count)
        for frame in set(parts[1:]):
            frames[(parts[0][:28], frame[:100])] += int(count)
    print(threads.most_common(6))
    for (thread, frame), count in frames.most_common(60):
        print(count, thread, frame)


if __name__ == "__main__":
    main()
