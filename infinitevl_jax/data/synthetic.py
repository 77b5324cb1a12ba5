"""Procedural vision-language data for tests and the CPU training demo (``infinitevl make-synthetic --out DIR``).

Tasks, each a sharegpt record whose assistant reply is one short word (also stored as ``"answer"``):
  colour   one shape on a plain background: "What is the colour of the shape?"
  shape    "Which shape is in the image?"
  count    1-6 shapes of one colour and kind on a 3x3 grid: "How many shapes are there?"
  memory   a video (8 frames at 2 fps) or a sequence of 4 images; only the first frame shows a coloured shape, the
           others grey distractors: "What was the colour of the shape in the first frame?"
Images are 56-112 px squares or near-squares (4 to 16 merged vision tokens each). Everything is a deterministic
function of the seed; the eval split uses an independent stream, so its images are held out.

Layout of DIR: ``train.jsonl``, ``eval.jsonl``, ``images/``, ``videos/`` (one folder of PNG frames per video, or
``.mp4`` files with ``video_format="mp4"``); media paths in records are relative to DIR.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (240, 220, 30),
    "orange": (245, 140, 20), "purple": (140, 40, 180), "white": (250, 250, 250), "black": (10, 10, 10),
}
BACKGROUNDS = ((128, 128, 128), (90, 100, 110), (170, 160, 150), (120, 135, 120))
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
TASKS = ("colour", "shape", "count", "memory")
VIDEO_FRAMES = 8
VIDEO_FPS = 2.0


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _canvas(rng: np.random.Generator) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    w, h = (int(rng.integers(56, 113)) for _ in range(2))
    image = Image.new("RGB", (w, h), BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    return image, ImageDraw.Draw(image)


def _one_shape(rng, colour: str, shape: str) -> Image.Image:
    image, draw = _canvas(rng)
    w, h = image.size
    side = rng.uniform(0.45, 0.8) * min(w, h)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
    return image


def _many_shapes(rng, n: int, colour: str, shape: str) -> Image.Image:
    image, draw = _canvas(rng)
    w, h = image.size
    cells = rng.permutation(9)[:n]
    cw, ch = w / 3, h / 3
    for c in cells:
        r, q = divmod(int(c), 3)
        pad = 0.15 * min(cw, ch)
        draw_shape(draw, shape, (q * cw + pad, r * ch + pad, (q + 1) * cw - pad, (r + 1) * ch - pad), COLOURS[colour])
    return image


def _distractor(rng, size) -> Image.Image:
    image = Image.new("RGB", size, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        g = int(rng.integers(60, 200))
        s = rng.uniform(0.2, 0.4) * min(size)
        x0, y0 = rng.uniform(0, size[0] - s), rng.uniform(0, size[1] - s)
        draw_shape(draw, SHAPES[rng.integers(len(SHAPES))], (x0, y0, x0 + s, y0 + s), (g, g, g))
    return image


def _save_video(frames: list[Image.Image], out_dir: str, rel: str, video_format: str):
    if video_format == "frames":
        os.makedirs(os.path.join(out_dir, rel), exist_ok=True)
        paths = []
        for i, f in enumerate(frames):
            p = f"{rel}/{i:02d}.png"
            f.save(os.path.join(out_dir, p))
            paths.append(p)
        return paths
    import av

    path = rel + ".mp4"
    w, h = (s - s % 2 for s in frames[0].size)
    with av.open(os.path.join(out_dir, path), "w") as out:
        stream = out.add_stream("mpeg4", rate=int(VIDEO_FPS))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "2"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_image(f.crop((0, 0, w, h)))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_record(rng: np.random.Generator, task: str, index: int, split: str, out_dir: str,
                video_format: str = "frames") -> dict:
    """One record of ``task``; media written under ``out_dir``."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    stem = f"{split}_{index:05d}"
    record: dict = {"task": task}
    if task in ("colour", "shape", "count"):
        if task == "count":
            n = int(rng.integers(1, 7))
            image, answer = _many_shapes(rng, n, colour, shape), NUMBERS[n]
            question = "How many shapes are there in the image? Answer with one word."
        else:
            image = _one_shape(rng, colour, shape)
            answer = colour if task == "colour" else shape
            question = ("What is the colour of the shape? Answer with one word." if task == "colour"
                        else "Which shape is in the image? Answer with one word.")
        rel = f"images/{stem}.png"
        image.save(os.path.join(out_dir, rel))
        record.update(images=[rel], messages=[{"role": "user", "content": "<image>" + question}])
    elif task == "memory":
        first = _one_shape(rng, colour, shape)
        question = "What was the colour of the shape in the first frame? Answer with one word."
        answer = colour
        if rng.random() < 0.5:
            frames = [first] + [_distractor(rng, first.size) for _ in range(VIDEO_FRAMES - 1)]
            record.update(videos=[_save_video(frames, out_dir, f"videos/{stem}", video_format)], video_fps=VIDEO_FPS,
                          messages=[{"role": "user", "content": "<video>" + question}])
        else:
            frames = [first] + [_distractor(rng, first.size) for _ in range(3)]
            rels = []
            for i, f in enumerate(frames):
                rels.append(f"images/{stem}_{i}.png")
                f.save(os.path.join(out_dir, rels[-1]))
            record.update(images=rels, messages=[{"role": "user", "content": "<image>" * len(rels) + question}])
    else:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    record["messages"].append({"role": "assistant", "content": answer})
    record["answer"] = answer
    return record


def generate(out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = 400, num_eval: int = 200,
             video_format: str = "frames") -> dict[str, str]:
    """Writes both splits; returns ``{"train": path, "eval": path}``. Tasks cycle so every split is balanced."""
    out_dir = os.fspath(out_dir)
    for sub in ("images", "videos"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    paths = {}
    for split, n, stream in (("train", num_train, 0), ("eval", num_eval, 1)):
        rng = np.random.default_rng([seed, stream])
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w") as f:
            for i in range(n):
                rec = make_record(rng, TASKS[i % len(TASKS)], i, split, out_dir, video_format)
                f.write(json.dumps(rec) + "\n")
        paths[split] = path
    return paths


# ---------------------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("make-synthetic", help="write the procedural image/video Q&A dataset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--video-format", choices=("frames", "mp4"), default="frames")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    paths = generate(args.out, seed=args.seed, num_train=args.num_train, num_eval=args.num_eval,
                     video_format=args.video_format)
    for split, path in paths.items():
        with open(path) as f:
            print(f"{split}: {sum(1 for _ in f)} records in {path}")
    return 0
