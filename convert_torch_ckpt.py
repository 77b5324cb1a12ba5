#!/usr/bin/env python
"""Hugging Face PyTorch checkpoints <-> infinitevl-jax Orbax checkpoints (same as ``infinitevl convert``).

    python convert_torch_ckpt.py --hf-dir HF_DIR --out OUT [--dtype bfloat16|float32] [--verify]
    python convert_torch_ckpt.py --to-hf --ckpt OUT --out HF_DIR
"""

import sys

from infinitevl_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
