"""Proof: `verify.verify` checks weights and outputs of every artifact against the
unmerged reference."""
