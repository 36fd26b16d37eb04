"""The ``omnigate`` command line, built on the Python SDK.

    omnigate generate --text "What do you hear in this audio?" --audio URL|PATH --max-new-tokens 20
    omnigate generate --text "Describe this video." --video clip.mp4 --fps 1 --load-audio-from-video \\
        --generation-mode audio --output answer.wav
    omnigate health
    omnigate models

Connection options (before or after the command): --gateway HOST:PORT ($OMNIGATE_GATEWAY), --api-key
($OMNIGATE_API_KEY), --timeout SECONDS, --retries N, and for TLS --tls, --ca-cert, --client-cert,
--client-key, --server-name. Exit status: 0 on success, 1 when the gateway answered with an error (or is
not SERVING), 2 for bad arguments or unreadable local files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from omnigate_client.client import OmnigateClient
from omnigate_client.errors import OmnigateClientError
from omnigate_client.protocol import media_part
from omnigate_client.types import GenerationResult, TextDelta

DEFAULT_GATEWAY = "127.0.0.1:50051"
DEFAULT_OUTPUT = {"audio": "output.wav", "image": "output.png"}
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_RETRIES = 3


def _connection_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The connection flags; on a sub-command they default to SUPPRESS so the top-level value stands."""

    def default(value):
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--gateway",
        default=default(os.environ.get("OMNIGATE_GATEWAY", DEFAULT_GATEWAY)),
        help=f"gateway address HOST:PORT (default: $OMNIGATE_GATEWAY or {DEFAULT_GATEWAY})",
    )
    parser.add_argument(
        "--api-key",
        default=default(os.environ.get("OMNIGATE_API_KEY")),
        help="API key, sent as 'authorization: Bearer KEY' (default: $OMNIGATE_API_KEY)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"deadline of the call in seconds, retries included (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=default(DEFAULT_RETRIES),
        help="retries on UNAVAILABLE or RESOURCE_EXHAUSTED with a retry delay, before any output "
        f"(default {DEFAULT_RETRIES}; 0 = none)",
    )
    parser.add_argument("--tls", action="store_true", default=default(False), help="connect with TLS")
    parser.add_argument(
        "--ca-cert", default=default(None), help="PEM file of the CA to trust (implies --tls)"
    )
    parser.add_argument(
        "--client-cert", default=default(None), help="PEM client certificate for mutual TLS (implies --tls)"
    )
    parser.add_argument("--client-key", default=default(None), help="PEM private key of --client-cert")
    parser.add_argument(
        "--server-name", default=default(None), help="name to check the server certificate against"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnigate", description="Talk to an Omnigate gateway.")
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="send a conversation turn and stream the answer")
    _connection_options(gen, top=False)
    gen.add_argument("--text", help="the user's text")
    gen.add_argument("--system", help="a system message placed before the user's turn")
    gen.add_argument("--image", action="append", default=[], metavar="URL|PATH", help="an image (repeatable)")
    gen.add_argument(
        "--audio", action="append", default=[], metavar="URL|PATH", help="an audio file (repeatable)"
    )
    gen.add_argument("--video", action="append", default=[], metavar="URL|PATH", help="a video (repeatable)")
    gen.add_argument("--fps", type=float, help="frames per second sampled from videos")
    gen.add_argument(
        "--load-audio-from-video", action="store_true", help="also give the model the videos' sound"
    )
    gen.add_argument("--generation-mode", choices=["text", "audio", "image"], default="text")
    gen.add_argument("--max-new-tokens", type=int, help="limit on generated text tokens")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--speaker", help="voice for speech output")
    gen.add_argument("--return-full-text", action="store_true", help="print the prompt before the answer")
    gen.add_argument("--output", help="file for generated speech (WAV) or image (PNG)")
    gen.add_argument(
        "--summary", action="store_true", help="print the final summary (and request id) as JSON on stderr"
    )

    health = commands.add_parser("health", help="print the gateway's health (exit 0 when SERVING)")
    _connection_options(health, top=False)
    models = commands.add_parser("models", help="print the served model and its limits as JSON")
    _connection_options(models, top=False)
    return parser


def _client(args: argparse.Namespace) -> OmnigateClient:
    if args.retries < 0:
        raise ValueError("--retries must be >= 0")
    if args.timeout <= 0:
        raise ValueError("--timeout must be > 0")
    return OmnigateClient(
        args.gateway,
        timeout_s=args.timeout,
        api_key=args.api_key or None,
        retries=args.retries,
        tls=args.tls or None,
        root_certificates=args.ca_cert,
        certificate_chain=args.client_cert,
        private_key=args.client_key,
        server_name=args.server_name,
    )


def _generate(client: OmnigateClient, args: argparse.Namespace) -> int:
    content = (
        [media_part("image", s) for s in args.image]
        + [media_part("video", s) for s in args.video]
        + [media_part("audio", s) for s in args.audio]
    )
    if args.text:
        content.append({"type": "text", "text": args.text})
    if not content:
        print("error: give --text and/or media (--image, --audio, --video)", file=sys.stderr)
        return 2
    messages = [{"role": "user", "content": content}]
    if args.system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": args.system}]})
    stream = client.generate(
        messages,
        generation_mode=args.generation_mode,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        return_full_text=args.return_full_text,
        fps=args.fps,
        load_audio_from_video=args.load_audio_from_video,
        speaker=args.speaker,
    )
    events = []
    with stream:
        for event in stream:
            events.append(event)
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
    result = GenerationResult.from_events(events, stream.request_id)
    if result.text:
        print()
    if result.audio:
        output = args.output or DEFAULT_OUTPUT["audio"]
        with open(output, "wb") as f:
            f.write(result.to_wav())
        print(
            f"wrote {result.audio.seconds:.2f} s of speech at {result.audio.sample_rate} Hz to {output}",
            file=sys.stderr,
        )
    if result.images:
        image = result.images[0]
        output = args.output or DEFAULT_OUTPUT["image"]
        with open(output, "wb") as f:
            f.write(image.data)
        print(f"wrote a {image.width}x{image.height} {image.mime_type} image to {output}", file=sys.stderr)
    if args.summary and result.summary is not None:
        summary = {**result.summary.to_dict(), "request_id": result.request_id, "attempts": stream.attempts}
        print(json.dumps(summary), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with _client(args) as client:
            if args.command == "health":
                state = client.health(timeout_s=min(args.timeout, 30.0))
                print(state)
                return 0 if state == "SERVING" else 1
            if args.command == "models":
                print(json.dumps(client.model_info(timeout_s=args.timeout).to_dict(), indent=2))
                return 0
            return _generate(client, args)
    except OmnigateClientError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
