"""``infinitevl generate`` (one question about images/videos) and ``infinitevl stream`` (questions asked at given
times of a video streamed frame by frame), printing tokens as they come."""

from __future__ import annotations

import argparse
import os
import sys


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="converted checkpoint directory (with tokenizer/processor files)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="compute dtype (default: stored)")


def _gen_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed)


def _load(args):
    import jax.numpy as jnp

    from infinitevl_jax.inference.api import InfiniteVL

    return InfiniteVL.from_pretrained(args.ckpt, dtype=getattr(jnp, args.dtype) if args.dtype else None)


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_generate(args) -> int:
    vl = _load(args)
    vl.chat(args.prompt, images=args.image or (), videos=args.video or (), on_text=_emit, **_gen_kwargs(args))
    _emit("\n")
    return 0


def parse_ask(spec: str) -> tuple[float, str]:
    sec, sep, question = spec.partition(":")
    try:
        if not sep or not question:
            raise ValueError
        return float(sec), question
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ask-at wants SECONDS:QUESTION, got {spec!r}") from None


def _video_frames(path: str, fps: float):
    """Frames sampled at ``fps`` from a video file, or the sorted images of a directory (taken to be at ``fps``)."""
    if os.path.isdir(path):
        from infinitevl_jax.processing.image import load_image

        names = sorted(n for n in os.listdir(path) if n.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
        return [load_image(os.path.join(path, n)) for n in names], fps
    from infinitevl_jax.processing.video import VideoProcessorConfig, decode_video

    return decode_video(path, VideoProcessorConfig.from_dict({"fps": fps, "max_frames": 1 << 30}))


def run_stream(args) -> int:
    from infinitevl_jax.inference.api import TextStreamer

    vl = _load(args)
    frames, fps = _video_frames(args.video, args.fps)
    session = vl.stream(fps=fps, max_length=args.max_length)
    asks = sorted(args.ask_at)
    for i, frame in enumerate(frames + [None]):
        now = i / fps
        while asks and (frame is None or asks[0][0] < now):
            at, question = asks.pop(0)
            _emit(f"[{at:.1f}s, {session.num_frames} frames] {question}\n")
            printer = TextStreamer(vl.processor, _emit)
            session.ask(question, on_token=printer, **_gen_kwargs(args))
            _emit("\n")
        if frame is not None:
            session.add_frames([frame], timestamps=[now])
    return 0


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="answer a prompt about images/videos")
    _sampling(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", action="append", help="image file (repeatable)")
    g.add_argument("--video", action="append", help="video file (repeatable)")
    g.set_defaults(func=run_generate)
