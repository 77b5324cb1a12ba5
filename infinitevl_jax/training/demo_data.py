"""The demo's synthetic task: facts to remember, questions about them, inside and beyond the SWA window.

Token-level (no images, so the CPU demo trains in minutes). A document is::

    BOS  F k1 v1  F k2 v2 ... [filler x L]  Q k_i  ->  v_i EOS

with keys ``k`` (8 tokens) and values ``v`` (16 tokens, chance = 1/16). *Short* documents hold two facts and at most
a few filler tokens, so everything is inside the sliding window; *long* documents hold one fact followed by ``filler``
tokens, more than the receptive field of a stack of SWA layers (``layers x (window - 1)`` tokens: information moves
at most ``window - 1`` positions per layer), so only a model with memory beyond the window (full attention, Gated
DeltaNet) can answer; an SWA-only model is at chance. Labels cover the answer and the stop token (the assistant reply), -100 elsewhere.

Batches have the layout of ``infinitevl_jax.data.packing`` (text only, one document per row) and are a pure function
of ``(seed, split, index)``, so the iterator state is just the index and resume is exact.
"""

from __future__ import annotations

import numpy as np

FACT, QUERY = 1, 2
KEYS = np.arange(3, 11)
VALUES = np.arange(16, 32)
FILLER = np.arange(40, 72)
CHANCE = 1.0 / len(VALUES)
SPLITS = {"train": 0, "eval_short": 1, "eval_long": 2, "eval_mixed": 3}


def document(rng: np.random.Generator, long: bool, filler: int, bos: int, eos: int):
    n_facts = 1 if long else 2
    keys = rng.choice(KEYS, n_facts, replace=False)
    values = rng.choice(VALUES, n_facts)
    toks = [bos]
    for k, v in zip(keys, values):
        toks += [FACT, int(k), int(v)]
    n_fill = filler if long else int(rng.integers(0, 4))
    toks += [int(x) for x in rng.choice(FILLER, n_fill)]
    i = int(rng.integers(n_facts))
    toks += [QUERY, int(keys[i])]
    answer = [int(values[i]), eos]
    ids = toks + answer
    labels = [-100] * len(toks) + answer
    return ids, labels


def make_batch(index: int, *, batch_size: int, seq_len: int, seed: int, split: str, long_fraction: float,
               filler: int, bos: int, eos: int, pad: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, SPLITS[split], index])
    ids = np.full((batch_size, seq_len), pad, np.int32)
    labels = np.full((batch_size, seq_len), -100, np.int32)
    seg = np.zeros((batch_size, seq_len), np.int32)
    pos = np.zeros((3, batch_size, seq_len), np.int32)
    frac = {"eval_short": 0.0, "eval_long": 1.0}.get(split, long_fraction)
    for b in range(batch_size):
        d, l = document(rng, bool(rng.random() < frac), filler, bos, eos)
        if len(d) > seq_len:
            raise ValueError(f"demo document of {len(d)} tokens does not fit data.seq_len={seq_len}")
        n = len(d)
        ids[b, :n], labels[b, :n], seg[b, :n] = d, l, 1
        pos[:, b, :n] = np.arange(n)
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "attention_mask": (seg > 0).astype(np.int32),
            "position_ids": pos}


class DemoIterator:
    """Deterministic batches with ``get_state``/``set_state`` like ``infinitevl_jax.data.DataIterator``."""

    def __init__(self, *, split: str = "train", **kw):
        self.split, self.kw, self.index = split, kw, 0
        self.skipped: dict[str, int] = {}

    def __iter__(self):
        return self

    def __next__(self):
        batch = make_batch(self.index, split=self.split, **self.kw)
        self.index += 1
        return batch

    @property
    def num_skipped(self) -> int:
        return 0

    def get_state(self) -> dict:
        return {"index": self.index, "split": self.split}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def close(self) -> None:
        pass
