"""Training data: sources, per-record transform, packing, the grain pipeline, synthetic data.

Importing this package does not import grain; ``build_dataset``/``make_data_iterator`` do, when called.
"""

from infinitevl_jax.data.packing import Packer, PackingSpec, pack
from infinitevl_jax.data.pipeline import DataConfig, DataIterator, SourceConfig, build_dataset, make_data_iterator
from infinitevl_jax.data.sources import ArrayRecordSource, JsonSource, RawRecord, TfdsSource
from infinitevl_jax.data.transform import RecordLimits, RecordTransform, Skipped

__all__ = [
    "ArrayRecordSource", "DataConfig", "DataIterator", "JsonSource", "Packer", "PackingSpec", "RawRecord",
    "RecordLimits", "RecordTransform", "Skipped", "SourceConfig", "TfdsSource", "build_dataset", "make_data_iterator",
    "pack",
]
