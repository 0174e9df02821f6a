"""Model access: references, lazy checkpoint readers, layer layout, sharded writer."""

DEFAULT_SHARD_SIZE = 5 * 2**30  # bytes per output shard; here so the CLI can show it without torch
