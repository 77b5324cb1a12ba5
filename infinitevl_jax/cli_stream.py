"""``infinitevl stream``: see ``cli_generate``."""

from __future__ import annotations

from infinitevl_jax.cli_generate import _sampling, parse_ask, run_stream


def register(subparsers) -> None:
    s = subparsers.add_parser("stream", help="stream a video frame by frame and answer questions at given times")
    _sampling(s)
    s.add_argument("--video", required=True, help="video file, or a directory of frame images")
    s.add_argument("--fps", type=float, default=2.0, help="frames per second fed to the model")
    s.add_argument("--ask-at", type=parse_ask, action="append", required=True, metavar="SECONDS:QUESTION")
    s.add_argument("--max-length", type=int, default=None, help="KV slots (teacher checkpoints only)")
    s.set_defaults(func=run_stream)
