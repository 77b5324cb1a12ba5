"""The grain training pipeline: sources -> shuffle/epochs/mixture -> process shard -> per-record transform ->
packing into fixed-shape batches -> worker processes. Its iterator state is saved with the training checkpoint.

    it = make_data_iterator(DataConfig(sources=(SourceConfig("data/train.jsonl"),), batch_size=8, seq_len=2048),
                            processor)
    batch = next(it)               # numpy dict, layout in ``infinitevl_jax.data.packing``
    state = it.get_state()         # JSON-serialisable; it.set_state(state) resumes with the very next batch
    it.skipped                     # counts of skipped records by reason; it.skip_log: the latest, with source:line

Order: each source is shuffled by ``seed`` (reshuffled every epoch), weighted sources are mixed, the stream is
sharded by JAX process (``process_index::process_count``) and then by worker; each worker packs its own records.
Batches therefore depend on ``worker_count`` (and ``read_threads`` does not matter), but are deterministic for a
given configuration, and restoring a state continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Iterator, Sequence

from infinitevl_jax.data.packing import Packer, PackingSpec
from infinitevl_jax.data.sources import ArrayRecordSource, JsonSource
from infinitevl_jax.data.transform import RecordLimits, RecordTransform, Skipped
from infinitevl_jax.processing import Processor

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    path: str  # a .json/.jsonl file, a directory of them, a glob, or ArrayRecord files (kind="arrayrecord")
    weight: float = 1.0
    media_root: str | None = None  # default: the directory of each JSON file (required for ArrayRecord)
    name: str | None = None
    kind: str = "json"  # "json" | "arrayrecord"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...]
    batch_size: int = 8
    seq_len: int = 2048
    cutoff_len: int | None = None  # default seq_len; longer records are truncated (text) or skipped (vision)
    truncate_text: bool = True
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None: repeat forever. With several sources each repeats forever (weighted mix).
    worker_count: int = 0  # grain worker processes (0: in the main process)
    worker_buffer_size: int = 2  # batches each worker keeps ready
    read_threads: int = 1  # threads per worker running the per-record transform
    process_index: int = 0
    process_count: int = 1
    # Static vision budget per batch (see PackingSpec.default for the defaults).
    max_images: int | None = None
    image_patch_buckets: tuple[int, ...] | None = None
    max_videos: int | None = None
    video_patch_buckets: tuple[int, ...] | None = None

    def packing_spec(self, patch_dim: int = 1176, merge_unit: int = 4) -> PackingSpec:
        return PackingSpec.default(
            self.batch_size, self.seq_len, max_images=self.max_images, image_patch_buckets=self.image_patch_buckets,
            max_videos=self.max_videos, video_patch_buckets=self.video_patch_buckets, merge_unit=merge_unit,
            patch_dim=patch_dim,
        )

    def record_limits(self, spec: PackingSpec) -> RecordLimits:
        cutoff = self.cutoff_len or self.seq_len
        if cutoff > self.seq_len:
            raise ValueError(f"cutoff_len={cutoff} > seq_len={self.seq_len}")
        return RecordLimits(cutoff, spec.max_images, spec.max_image_patches, spec.max_videos, spec.max_video_patches,
                            self.truncate_text)


def _make_source(sc: SourceConfig):
    if sc.kind == "json":
        return JsonSource(sc.path, sc.media_root, sc.name)
    if sc.kind == "arrayrecord":
        if sc.media_root is None:
            raise ValueError(f"ArrayRecord source {sc.path} needs a media_root")
        return ArrayRecordSource(sc.path, sc.media_root, sc.name)
    raise ValueError(f"unknown source kind {sc.kind!r} (json, arrayrecord; TFDS: pass a TfdsSource to build_dataset)")


def build_dataset(config: DataConfig, processor: Processor, sources: Sequence[Any] | None = None):
    """The ``grain.IterDataset`` of packed batches (each with a ``"skipped"`` tuple of ``Skipped``).

    ``sources`` overrides ``config.sources`` with ready random-access sources (e.g. ``TfdsSource``), weighted by
    the configs' weights when both are given, else uniformly.
    """
    import grain  # the ``data`` extra; kept out of module import so inference hosts need no grain

    srcs = list(sources) if sources is not None else [_make_source(sc) for sc in config.sources]
    weights = [sc.weight for sc in config.sources] if len(config.sources) == len(srcs) else [1.0] * len(srcs)
    if not srcs:
        raise ValueError("no data sources")
    datasets = []
    for i, src in enumerate(srcs):
        ds = grain.MapDataset.source(src)
        if config.shuffle:
            ds = ds.shuffle(seed=(config.seed * 1_000_003 + i) % (2**32))
        datasets.append(ds)
    if len(datasets) == 1:
        ds = datasets[0].repeat(config.num_epochs) if config.num_epochs != 1 else datasets[0]
    else:
        ds = grain.MapDataset.mix([d.repeat(None) for d in datasets], weights)
    ds = ds[config.process_index::config.process_count]
    spec = config.packing_spec(processor.image_config.patch_dim, processor.image_config.merge_size**2)
    ds = ds.map(RecordTransform(processor, config.record_limits(spec)))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, config.read_threads), prefetch_buffer_size=4))
    from infinitevl_jax.data.grain_packing import PackedBatchIterDataset

    packed = PackedBatchIterDataset(it_ds, spec)
    if config.worker_count > 0:
        _ensure_absl_flags_parsed()
        packed = packed.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return packed


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; a program that never ran absl.app (pytest, notebooks, our CLI)
    # has unparsed flags, which grain reports as an error. Their defaults are what we want.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataIterator:
    """Iterator over packed batches with checkpointable state and skipped-record accounting."""

    def __init__(self, dataset, log_limit: int = 1000):
        self._dataset = dataset
        self._it = iter(dataset)
        self.skipped: collections.Counter[str] = collections.Counter()
        self.skip_log: collections.deque[Skipped] = collections.deque(maxlen=log_limit)
        self.batches = 0

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while True:
            batch = dict(next(self._it))
            for s in batch.pop("skipped", ()):
                self.skipped[s.kind] += 1
                self.skip_log.append(s)
                logger.warning("skipped record %s", s)
            if batch["segment_ids"].any():  # an all-padding batch only carries the last skipped records
                self.batches += 1
                return batch

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def get_state(self) -> dict[str, Any]:
        """grain's iterator state plus the skip counters; JSON-serialisable."""
        return {"grain": self._it.get_state(), "skipped": dict(self.skipped), "batches": self.batches}

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state["grain"])
        self.skipped = collections.Counter(state.get("skipped", {}))
        self.batches = int(state.get("batches", 0))

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def make_data_iterator(config: DataConfig, processor: Processor | str | os.PathLike,
                       sources: Sequence[Any] | None = None) -> DataIterator:
    """``processor``: a ``Processor`` or a directory for ``Processor.from_pretrained``."""
    if not isinstance(processor, Processor):
        processor = Processor.from_pretrained(processor)
    return DataIterator(build_dataset(config, processor, sources))
