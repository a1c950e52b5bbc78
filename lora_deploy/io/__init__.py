"""I/O without torch: lazy sharded checkpoints (`checkpoint`), streaming reads and shard
writes (`stream`), locked staging for atomic outputs (`staging`), the SHA-256 and header
that reports carry (`provenance`), and the one reader of `--inputs FILE.npz` (`npz`)."""
