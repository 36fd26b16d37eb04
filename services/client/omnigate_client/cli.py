"""The ``omnigate`` command line.

    omnigate generate --text "What do you hear in this audio?" --audio URL|PATH --max-new-tokens 20
    omnigate generate --text "Describe this video." --video clip.mp4 --fps 1 --load-audio-from-video \\
        --generation-mode audio --output answer.wav
    omnigate health
    omnigate models
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from omnigate_client.client import AudioChunk, Image, OmnigateClient, Result, Summary, TextDelta, media_part

DEFAULT_GATEWAY = "127.0.0.1:50051"
DEFAULT_OUTPUT = {"audio": "output.wav", "image": "output.png"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnigate", description="Talk to an Omnigate gateway.")
    parser.add_argument(
        "--gateway",
        default=os.environ.get("OMNIGATE_GATEWAY", DEFAULT_GATEWAY),
        help=f"gateway address HOST:PORT (default: $OMNIGATE_GATEWAY or {DEFAULT_GATEWAY})",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="send a conversation turn and stream the answer")
    gen.add_argument("--gateway", default=argparse.SUPPRESS, help="gateway address HOST:PORT")
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
    gen.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds (default 600)")
    gen.add_argument("--summary", action="store_true", help="print the final summary as JSON on stderr")

    health = commands.add_parser("health", help="print the gateway's health (exit 0 when SERVING)")
    health.add_argument("--gateway", default=argparse.SUPPRESS, help="gateway address HOST:PORT")
    models = commands.add_parser("models", help="print the served model and its limits as JSON")
    models.add_argument("--gateway", default=argparse.SUPPRESS, help="gateway address HOST:PORT")
    return parser


def _generate(client: OmnigateClient, args) -> int:
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
    result = Result()
    for event in client.generate(
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
        timeout_s=args.timeout,
    ):
        if isinstance(event, TextDelta):
            print(event.text, end="", flush=True)
            result.text += event.text
        elif isinstance(event, AudioChunk):
            result.audio.append(event)
        elif isinstance(event, Image):
            result.images.append(event)
        elif isinstance(event, Summary):
            result.summary = event
    if result.text:
        print()
    output = args.output or DEFAULT_OUTPUT.get(args.generation_mode)
    if result.audio:
        with open(output, "wb") as f:
            f.write(result.wav_bytes())
        seconds = result.summary.audio_seconds if result.summary else 0.0
        print(
            f"wrote {seconds:.2f} s of speech at {result.audio[0].sample_rate} Hz to {output}",
            file=sys.stderr,
        )
    if result.images:
        with open(output, "wb") as f:
            f.write(result.images[0].data)
        image = result.images[0]
        print(f"wrote a {image.width}x{image.height} {image.mime_type} image to {output}", file=sys.stderr)
    if args.summary and result.summary is not None:
        print(json.dumps(result.summary.__dict__), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with OmnigateClient(args.gateway) as client:
            if args.command == "health":
                state = client.health()
                print(state)
                return 0 if state == "SERVING" else 1
            if args.command == "models":
                print(json.dumps(client.model_info(), indent=2))
                return 0
            return _generate(client, args)
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
