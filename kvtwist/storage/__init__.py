"""Everything behind the store interface: the in-memory map, the journal and snapshot formats,
recovery, compaction and the fsync policies."""
