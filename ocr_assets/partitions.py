"""One partition per dataset shard, added at run time by the shard sensor or the CLI."""

import dagster as dg

SHARDS = "shards"

shards_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)
