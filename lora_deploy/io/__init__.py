"""I/O without torch: lazy sharded checkpoints (`checkpoint`), streaming reads and shard
writes (`stream`), locked staging for atomic outputs (`staging`), and the SHA-256 and header
that reports carry (`provenance`)."""
