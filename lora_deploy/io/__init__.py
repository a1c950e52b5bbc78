"""I/O without torch: lazy sharded checkpoints (`checkpoint`), streaming reads and shard
writes (`stream`), and locked staging for atomic outputs (`staging`)."""
