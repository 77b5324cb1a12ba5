"""The ``infinitevl`` command line: one entry point, one subcommand per module.

Each module listed in ``SUBCOMMANDS`` defines ``register(subparsers)`` which adds its parser and sets
``func=callable(args) -> int``. Modules are imported lazily so ``infinitevl --help`` stays fast and a subcommand's
optional dependencies are only needed when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (name, module, one-line help). The module's ``register`` is imported only when the subcommand is used.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("info", "infinitevl_jax.cli_info", "print a config's layer pattern and parameter count"),
    ("make-synthetic", "infinitevl_jax.data.synthetic", "write the procedural image/video Q&A dataset"),
    ("eval", "infinitevl_jax.evaluation.cli", "evaluate a checkpoint on VLM benchmarks from local files"),
    ("convert", "infinitevl_jax.convert", "convert Hugging Face <-> Orbax checkpoints"),
    ("generate", "infinitevl_jax.cli_generate", "answer a prompt about images/videos"),
    ("stream", "infinitevl_jax.cli_stream", "stream a video and answer questions at given times"),
    ("merge-lora", "infinitevl_jax.training.merge_lora", "fold a training run's LoRA adapters into the base for export"),
]


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinitevl", description="InfiniteVL in JAX: convert, train, generate, evaluate")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in SUBCOMMANDS:
        if selected == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = argv[0] if argv and not argv[0].startswith("-") else None
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if selected is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
