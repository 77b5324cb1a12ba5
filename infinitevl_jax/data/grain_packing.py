"""The grain ``IterDataset`` that packs per-record examples into fixed-shape batches (imports grain)."""

from __future__ import annotations

import grain

from infinitevl_jax.data.packing import Packer, PackingSpec
from infinitevl_jax.data.transform import Skipped


class PackedBatchIterDataset(grain.IterDataset):
    """Packs examples into ``Packer`` batches; ``Skipped`` markers ride along as ``batch["skipped"]``."""

    def __init__(self, parent: grain.IterDataset, spec: PackingSpec):
        super().__init__(parent)
        self._spec = spec

    def __iter__(self) -> "PackedBatchIterator":
        return PackedBatchIterator(self._parent.__iter__(), self._spec)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset(batch={self._spec.batch_size}, seq_len={self._spec.seq_len})"


class PackedBatchIterator(grain.DatasetIterator):
    """At most one example is read ahead: the one that did not fit the last batch. The saved state is the parent's
    state before that example, so a restored iterator reads it again and continues exactly as before."""

    def __init__(self, parent: grain.DatasetIterator, spec: PackingSpec):
        super().__init__(parent)
        self._spec = spec
        self._pending = None
        self._pending_state = None

    def __next__(self) -> dict:
        packer = Packer(self._spec)
        skipped = []
        if self._pending is not None:
            packer.try_add(self._pending)
            self._pending = self._pending_state = None
        while True:
            state = self._parent.get_state()
            try:
                ex = next(self._parent)
            except StopIteration:
                if packer.count == 0 and not skipped:
                    raise
                break
            if isinstance(ex, Skipped):
                skipped.append(ex)
                continue
            if not packer.try_add(ex):
                self._pending, self._pending_state = ex, state
                break
        # With no example left (only skipped records at the end of the data) the batch is all padding.
        batch = packer.finish()
        batch["skipped"] = tuple(skipped)
        return batch

    def get_state(self) -> dict:
        return {"parent": self._pending_state if self._pending is not None else self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
