"""`mlxpool watch [DIR]` (the daemon) and `mlxpool transcribe FILE` (the same pipeline, once)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mlxpool.watch import outputs, pipeline
from mlxpool.watch.chunks import DEFAULT_CHUNK_CHARS
from mlxpool.watch.client import DEFAULT_URL, ServerClient, ServerError

DEFAULT_FOLDER = "~/transcribe"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `watch` and `transcribe` on the `mlxpool` command's subparsers."""
    common = _common_flags()
    watch = commands.add_parser(
        "watch", parents=[common], help="transcribe and correct audio dropped in a folder (a daemon)"
    )
    watch.add_argument(
        "folder",
        nargs="?",
        default=os.environ.get("MLXPOOL_WATCH_DIR") or DEFAULT_FOLDER,
        metavar="DIR",
        help=f"the folder to watch (default: $MLXPOOL_WATCH_DIR or {DEFAULT_FOLDER})",
    )
    watch.add_argument(
        "--settle", type=float, default=2.0, help="seconds a file must stay unchanged before it is taken (2)"
    )
    watch.add_argument("--poll", action="store_true", help="poll the folder instead of OS events (network drives)")
    watch.add_argument("--once", action="store_true", help="process the files waiting, then exit")
    watch.set_defaults(func=cmd_watch)

    transcribe = commands.add_parser("transcribe", parents=[common], help="transcribe one audio file")
    transcribe.add_argument("file", metavar="FILE", help="the audio file")
    transcribe.add_argument("--correct", action="store_true", help="correct the transcript with the LLM")
    transcribe.add_argument("--format", choices=["md", "txt", "srt"], default="md", help="output format (md)")
    transcribe.add_argument("-o", "--output", metavar="OUT", help="write here instead of to standard output")
    transcribe.add_argument(
        "--wait", type=float, default=30.0, help="seconds to keep trying a server that cannot be reached (30)"
    )
    transcribe.set_defaults(func=cmd_transcribe)


def _common_flags() -> argparse.ArgumentParser:
    env = os.environ
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--url", default=env.get("MLXPOOL_URL", DEFAULT_URL), help="server address")
    flags.add_argument("--api-key", default=env.get("MLXPOOL_API_KEY"), help="API key (default: $MLXPOOL_API_KEY)")
    flags.add_argument(
        "--asr-model",
        default=env.get("MLXPOOL_ASR_MODEL") or "whisper-1",
        help="transcription model (default: $MLXPOOL_ASR_MODEL or whisper-1, the server's default asr model)",
    )
    flags.add_argument(
        "--llm-model",
        default=env.get("MLXPOOL_LLM_MODEL") or "gpt-4o",
        help="correcting model (default: $MLXPOOL_LLM_MODEL or gpt-4o, the server's default chat model)",
    )
    flags.add_argument(
        "--language",
        default=env.get("MLXPOOL_LANGUAGE") or None,
        help="spoken language code, e.g. en (default: $MLXPOOL_LANGUAGE, else detected)",
    )
    flags.add_argument(
        "--prompt-file",
        default=env.get("MLXPOOL_PROMPT_FILE") or None,
        help="the correction prompt, a text file (default: $MLXPOOL_PROMPT_FILE, else a built-in prompt)",
    )
    flags.add_argument(
        "--chunk-chars",
        type=_positive,
        default=DEFAULT_CHUNK_CHARS,
        help=f"longest piece of transcript corrected per request, in characters ({DEFAULT_CHUNK_CHARS})",
    )
    flags.add_argument(
        "--max-tokens", type=_positive, help="correction length limit per piece (default: twice the piece)"
    )
    flags.add_argument("--retries", type=int, default=5, help="retries of a busy server (503...) per request (5)")
    flags.add_argument("--timeout", type=float, default=3600.0, help="seconds one request may take (3600)")
    return flags


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def cmd_watch(args: argparse.Namespace) -> int:
    from mlxpool.watch.daemon import Daemon, WatchSettings
    from mlxpool.watch.journal import FolderBusyError

    _log_to_file_or_exit()
    options = _options_or_exit(args)
    folder = Path(args.folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"mlxpool watch: cannot use {folder}: {exc}", file=sys.stderr)
        return 1
    tick = max(0.05, min(0.5, args.settle / 2))
    settings = WatchSettings(folder, settle=args.settle, tick=tick, poll=args.poll, once=args.once)
    client = ServerClient(args.url, retries=args.retries, timeout=args.timeout, api_key=args.api_key)
    try:
        Daemon(settings, client, options).run()
    except (FolderBusyError, ServerError) as exc:
        print(f"mlxpool watch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = _options_or_exit(args)
    audio = Path(args.file)
    if not audio.is_file():
        print(f"mlxpool transcribe: no such file: {audio}", file=sys.stderr)
        return 2
    client = ServerClient(
        args.url, retries=args.retries, timeout=args.timeout, unreachable_wait=args.wait, api_key=args.api_key
    )
    try:
        text = _transcript(client, audio, options, args.format, args.correct)
    except ServerError as exc:
        print(f"mlxpool transcribe: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.output:
        from mlxpool.watch.folder import write_atomic

        write_atomic(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0


def _transcript(client: ServerClient, audio: Path, options: pipeline.Options, format: str, correct: bool) -> str:
    heard = pipeline.transcribe(client, audio, options)
    if format == "srt":
        segments = heard.segments
        if correct:
            segments = [s.model_copy(update={"text": _corrected(client, s.text, options)}) for s in segments]
        return outputs.srt(segments)
    text, corrected_by = pipeline.correct(client, heard.text, options) if correct else (heard.text, "")
    if format == "txt":
        return text + "\n"
    if correct:
        return outputs.corrected_markdown(audio.name, heard, text, corrected_by, outputs.now())
    return outputs.raw_markdown(audio.name, heard, outputs.now())


def _corrected(client: ServerClient, text: str, options: pipeline.Options) -> str:
    return pipeline.correct(client, text, options)[0] if text.strip() else text


def _log_to_file_or_exit() -> None:
    """Log to stderr and to logs_dir/watch.log (the config's, like the server's), which `mlxpool logs watch` reads."""
    from mlxpool import logs
    from mlxpool.config import load_settings

    server = load_settings().server
    try:
        logs.configure(server, "watch")
    except OSError as exc:
        raise SystemExit(f"mlxpool watch: cannot write the log in {server.logs_dir}: {exc.strerror or exc}") from None
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is the server's log's job


def _options_or_exit(args: argparse.Namespace) -> pipeline.Options:
    prompt = pipeline.DEFAULT_PROMPT
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SystemExit(f"mlxpool: cannot read the prompt file: {exc}") from None
    return pipeline.Options(
        asr_model=args.asr_model,
        llm_model=args.llm_model,
        language=args.language,
        prompt=prompt,
        chunk_chars=args.chunk_chars,
        max_tokens=args.max_tokens,
    )
