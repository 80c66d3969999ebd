"""hpcdistill.record: the HDF5 shard of a run (schema, atomic writer, streaming reader).

The contract is docs/shard-format.md; the names come from hpcdistill.record.schema.
"""

from hpcdistill.record.reader import RolloutRecord, ShardReader, find_shards, iter_shards, scan_shards
from hpcdistill.record.schema import KINDS, READABLE_VERSIONS, SCHEMA_VERSION
from hpcdistill.record.writer import ShardWriter

__all__ = ["KINDS", "READABLE_VERSIONS", "SCHEMA_VERSION", "RolloutRecord", "ShardReader", "ShardWriter",
           "find_shards", "iter_shards", "scan_shards"]
