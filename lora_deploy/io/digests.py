"""File digests for manifests and reports, and a memo so an unchanged input is hashed once.

Algorithms:
* **BLAKE3** (the default for the merge manifest): 3.5-4 GB/s per core on the benchmark
  machine (AVX-512) against 0.7-1.5 GB/s for SHA-256 with the CPU's SHA instructions;
  check a file with `b3sum FILE` (or `python -c "import blake3; ..."`).
* **SHA-256**: what the Hugging Face Hub names LFS files by (the `lfs.sha256` of a file in
  the Hub's API, the blob names in its local cache) and what `sha256sum` prints. Recorded
  when asked (`merge --sha256`) and in verify reports (lora_deploy.io.provenance).

The memo: a file's digests are remembered under its identity (device, inode, size,
mtime_ns, ctime_ns) and reused while that identity holds, so merging several adapters into
one base reads the base's bytes for the merge, not again for its digests. The ctime is the
guard: the kernel sets it to the current time on every write, truncate, rename, chmod or
utime, and no system call sets it back, so a file rewritten in place with its size and
mtime restored (`touch -d`, `cp -p`) still misses. What a hit cannot see is a change made
under the file system (bit rot, a raw block device write): `merge --rehash` reads every
input again. A hit is taken only when every asked algorithm is remembered. A file changed
less than RACY_NS before it was opened is not remembered: time stamps are coarser than
their nanoseconds (a clock tick; 2 s on FAT), so a second write within the same tick would
leave the identity as it was (git's "racily clean" entries).

Where the memo lives: under the user's cache directory (`$LORA_DEPLOY_CACHE`, else
`$XDG_CACHE_HOME/lora-deploy`, else `~/.cache/lora-deploy`), one small JSON file per file
identity in `digests/`. Not beside the inputs: inputs are never written to (the output
policy), a Hugging Face cache or a read-only mount could not take it, and an xattr on the
file would itself change the ctime it is keyed on. One file per identity, replaced
atomically, lets concurrent runs share the memo without a lock (two runs storing the same
identity store the same digests). A memo that cannot be read or written is skipped: the
digests are then computed, never guessed. A caller with its own cache (a pipeline on
shared storage) passes its own `DigestMemo(root)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import blake3

from lora_deploy.errors import LoraDeployError
from lora_deploy.io.staging import write_file_atomic

ALGORITHMS = ("blake3", "sha256")
DEFAULT_ALGORITHMS = ("blake3",)
READ_CHUNK = 16 * 1024 * 1024
RACY_NS = 2_000_000_000

Digests = dict[str, str]  # algorithm -> hex digest


def new_hash(algorithm: str, parallel: bool = True) -> Any:
    """A fresh hash object (update / hexdigest). With `parallel`, BLAKE3 spreads each large
    update over every core (its own thread pool); both release the GIL while they hash."""
    if algorithm == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO if parallel else 1)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


class MultiHash:
    """Several algorithms fed the same bytes."""

    def __init__(self, algorithms: Iterable[str], parallel: bool = True):
        self._hashes = {name: new_hash(name, parallel) for name in algorithms}

    def update(self, data: bytes | memoryview) -> None:
        for h in self._hashes.values():
            h.update(data)

    def hexdigests(self) -> Digests:
        return {name: h.hexdigest() for name, h in self._hashes.items()}


def file_digests(
    path: str | os.PathLike, algorithms: Iterable[str] = DEFAULT_ALGORITHMS, memo: DigestMemo | None = None
) -> Digests:
    """{algorithm: hex digest} of a whole file, from the memo when it knows the file."""
    algorithms = tuple(algorithms)
    with open(path, "rb") as f:
        before, opened_ns = os.fstat(f.fileno()), time.time_ns()
        if memo is not None and (known := memo.lookup(before, algorithms)) is not None:
            return known
        h = MultiHash(algorithms)
        while block := f.read(READ_CHUNK):
            h.update(block)
        digests = h.hexdigests()
        if memo is not None:
            memo.store(path, before, opened_ns, os.fstat(f.fileno()), digests)
    return digests


def file_sha256(path: str | os.PathLike) -> str:
    return file_digests(path, ("sha256",))["sha256"]


def identity(st: os.stat_result) -> list[int]:
    """What must be unchanged for a remembered digest to hold: see the module docstring."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def default_root() -> Path | None:
    """$LORA_DEPLOY_CACHE, else $XDG_CACHE_HOME/lora-deploy, else ~/.cache/lora-deploy; None
    when there is no home directory to put it in (the memo is then off)."""
    if root := os.environ.get("LORA_DEPLOY_CACHE"):
        return Path(root)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "lora-deploy"
    try:
        return Path.home() / ".cache" / "lora-deploy"
    except RuntimeError:  # no HOME and no password entry
        return None


class DigestMemo:
    """Digests remembered by file identity, one JSON file per identity under `root/digests`."""

    def __init__(self, root: str | os.PathLike | None = None, *, refresh: bool = False):
        root = Path(root) if root is not None else default_root()
        self.dir = root / "digests" if root is not None else None
        self.refresh = refresh  # look nothing up (every file is hashed), but remember what is hashed

    def _entry(self, st: os.stat_result) -> Path | None:
        return self.dir / f"{st.st_dev}-{st.st_ino}.json" if self.dir is not None else None

    def _remembered(self, st: os.stat_result) -> Digests:
        """Everything remembered of the file `st` describes ({} when nothing holds)."""
        path = self._entry(st)
        if path is None:
            return {}
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(entry, dict) or entry.get("identity") != identity(st):
            return {}
        known = entry.get("digests")
        return {a: v for a, v in known.items() if isinstance(v, str)} if isinstance(known, dict) else {}

    def lookup(self, st: os.stat_result, algorithms: Iterable[str]) -> Digests | None:
        """The remembered digests of the file `st` describes, if every one asked for is known."""
        if self.refresh:
            return None
        known = self._remembered(st)
        algorithms = tuple(algorithms)
        return {a: known[a] for a in algorithms} if all(a in known for a in algorithms) else None

    def store(
        self, path: str | os.PathLike, before: os.stat_result, opened_ns: int, after: os.stat_result, digests: Digests
    ) -> None:
        """Remember `digests` of the file that was `before` when its reading began (at
        time.time_ns() `opened_ns`), if it is still the same file (`after`, taken when the
        reading ended), with what is remembered of it under other algorithms. Best effort:
        a failure is ignored."""
        target = self._entry(before)
        if target is None or identity(before) != identity(after):
            return  # no memo, or changed while it was read: the digests describe no file
        if opened_ns - before.st_ctime_ns < RACY_NS:
            return  # changed just before: a change within the same clock tick would not show
        entry = {
            "path": os.path.abspath(path),
            "identity": identity(before),
            "digests": {**self._remembered(before), **digests},
        }
        data = (json.dumps(entry) + "\n").encode()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(target, lambda f: f.write(data), overwrite=True)
        except (OSError, LoraDeployError):
            pass
