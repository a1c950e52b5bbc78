"""`lora-deploy run PIPELINE.yaml`: run a pipeline's tasks into an artifact bundle.

The bundle is built in a locked hidden sibling of OUT (lora_deploy.io.staging) and
replaces the old bundle in one rename, only when every required step passed. A failed
run leaves the old bundle as it was and moves its own partial results, with its manifest,
to `OUT.failed` beside it (replacing an earlier failed run's; a run that passes removes
it). An interrupted run (Ctrl-C, SIGTERM, a kill) leaves the old bundle and no partial
output (a killed run's staging directory is removed by the next run).

Each task runs from the step cache when its key is there (cache), else through its step
(steps), as soon as the tasks it needs are done, up to `jobs` at once (Runner); bench is
never taken from the cache unless its `cache` option says so, and runs alone. The bundle
gets pipeline-manifest.json (manifest).
"""

from __future__ import annotations

import itertools
import os
import platform
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_deploy.errors import BadInputError, InternalError, LoraDeployError, OutputError
from lora_deploy.io.provenance import report_header
from lora_deploy.io.staging import (
    check_output,
    discard,
    output_error,
    refuse_input_overlap,
    replace_dir,
    staging_dir,
)
from lora_deploy.pipeline.baseline import previous_bench
from lora_deploy.pipeline.cache import (
    Entry,
    Hasher,
    StepCache,
    default_cache_root,
    files_under,
    json_key,
    link_tree,
    tool_version,
    tree_key,
    write_entry,
)
from lora_deploy.pipeline.load import load_pipeline
from lora_deploy.pipeline.manifest import (
    FAILED,
    MANIFEST,
    PASSED,
    SKIPPED,
    StepRecord,
    build_manifest,
    write_bundle_files,
)
from lora_deploy.pipeline.plan import BASE, Task, adapter_names, plan_tasks
from lora_deploy.pipeline.spec import STEP_KINDS, PipelineError, Target
from lora_deploy.pipeline.steps import Outcome

FAILED_SUFFIX = ".failed"


class PipelineFailed(LoraDeployError):
    """A required step failed: exit 1 for a gate or verification, 2 for bad input, 3 for a
    failed write or a bug (the worst of the failed steps). Carries the run's manifest."""

    def __init__(self, message: str, exit_code: int, manifest: dict[str, Any]):
        super().__init__(message)
        self.exit_code = exit_code
        self.manifest = manifest


@dataclass
class RunResult:
    out: Path
    manifest: dict[str, Any]
    records: list[StepRecord]


def probe_target(target: Target) -> str | None:
    """Why the target cannot run here (None: it can)."""
    if target.runtime == "tensorrt":
        from lora_deploy.backends.trt import versions

        try:
            versions.require_tensorrt()
        except BadInputError as exc:
            return str(exc)
        return None
    if target.device == "cuda":
        from lora_deploy.backends.onnxrt import gpu

        try:
            gpu.require_providers(gpu.choose("cuda", target.provider))
        except BadInputError as exc:
            return str(exc)
    return None


def run_pipeline(
    path: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    only: Sequence[str] = (),
    force: bool = False,
    jobs: int | None = None,
    ray: str | None = None,
    echo: Callable[[str], None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunResult:
    """Run the pipeline file at `path` into its bundle (`out`, else the file's `out:`).

    `overrides`: `key=value` (`--set`); `only`: step names (their tasks and what they
    need); `force`: run every task again, whatever the cache holds; `jobs`: how many steps
    run at once (default: the cores, at most 4; bench always runs alone); `ray`: run the
    steps as tasks of the Ray cluster at this address ("local": a Ray instance started for
    the run; see distributed); `echo`: one line per step as it ends (and bench figures).
    Raises PipelineError (exit 2) for a bad pipeline file before any work, PipelineFailed
    when a required step failed."""
    started = time.time()
    echo = echo or (lambda line: None)
    path = Path(path)
    pipeline, document = load_pipeline(path, overrides, environ)
    bundle = Path(out) if out is not None else pipeline.out
    if bundle is None:
        raise PipelineError(f"{path}: no bundle directory: give --out DIR or out: in the file")
    bundle = Path(os.path.abspath(bundle))
    steps = pipeline.step_options()
    unknown = [s for s in only if s not in STEP_KINDS]
    if unknown:
        raise PipelineError(f"--only {unknown[0]}: no such step (steps: {', '.join(STEP_KINDS)})")
    missing = [s for s in only if s not in steps]
    if missing:
        raise PipelineError(f"--only {missing[0]}: {path} has no {missing[0]} step")
    unavailable = {}
    for name, target in pipeline.targets.items():
        reason = probe_target(target)
        if reason is not None and target.required:
            raise PipelineError(
                f"{path}: target {name} is required but cannot run here: {reason} "
                f"(mark it required: false to skip its steps where it cannot run)"
            )
        if reason is not None:
            unavailable[name] = reason
    adapters = adapter_names(pipeline.adapter_dirs())
    cache_root = Path(os.path.abspath(pipeline.cache)) if pipeline.cache else default_cache_root()
    if cache_root is None:
        raise PipelineError("no cache directory: set cache: in the pipeline, or $LORA_DEPLOY_CACHE")
    inputs = [pipeline.base, *adapters.values(), path]
    check_cache_root(cache_root, inputs)
    check_bundle_target(bundle, inputs, cache_root)
    jobs = DEFAULT_JOBS if jobs is None else jobs
    if jobs < 1:
        raise PipelineError(f"--jobs {jobs}: give 1 or more")
    hasher = Hasher()
    tasks = plan_tasks(
        pipeline,
        adapters,
        unavailable,
        set(only) or None,
        previous=lambda unit, target: previous_bench(bundle, unit, target, hasher),
    )
    executor = None
    if ray is not None:
        from lora_deploy.pipeline.distributed import RayExecutor

        executor = RayExecutor(ray)
    runner = Runner(StepCache(cache_root), hasher, force, echo, jobs, executor)
    with staging_dir(bundle, overwrite=True, inputs=[*inputs, cache_root]) as tmp:
        try:
            records = runner.run(tasks, tmp)
            cluster = executor.describe() if executor is not None else None
        finally:
            if executor is not None:
                executor.close()
        failed = [r for r in records if r.status == FAILED and r.task.required]
        inputs_hashed = {
            "base": {"path": os.path.abspath(pipeline.base), "sha256": runner.input_digests(Path(pipeline.base))},
            "adapters": {
                name: {"path": os.path.abspath(a), "sha256": runner.input_digests(Path(a))}
                for name, a in adapters.items()
            },
        }
        manifest = build_manifest(
            pipeline,
            path,
            overrides,
            only,
            records,
            inputs_hashed,
            runner.tool,
            runner.hasher,
            unavailable,
            started,
            failed,
            {
                "jobs": jobs,
                "ray": cluster,
                "cache": str(cache_root),
                "never_cached": {
                    t.name: "measured on every run (a latency check never reuses an earlier measurement)"
                    for t in tasks
                    if not t.cacheable
                },
            },
        )
        write_bundle_files(tmp, manifest, document, runner.hasher)
        if failed:
            kept = keep_failed_run(tmp, bundle.with_name(bundle.name + FAILED_SUFFIX), inputs)
            code = max(r.exit_code or 1 for r in failed)
            first = failed[0]
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise PipelineFailed(
                f"{first.task.name}: {first.error}{more}; {bundle} left as it was, {kept}", code, manifest
            )
    stale = bundle.with_name(bundle.name + FAILED_SUFFIX)
    if stale.is_dir() and (stale / MANIFEST).is_file():
        discard(stale)
    return RunResult(bundle, manifest, records)


def keep_failed_run(tmp: Path, failed_dir: Path, inputs: list) -> str:
    """Move a failed run's bundle to `failed_dir` (replacing an earlier failed run's, never
    another directory); says where its results are."""
    if failed_dir.is_dir() and any(failed_dir.iterdir()) and not (failed_dir / MANIFEST).is_file():
        return f"this run's results not kept: {failed_dir} exists and is not a failed run's"
    check_output(failed_dir, inputs, overwrite=True, directory=True)
    replace_dir(tmp, failed_dir)
    return f"this run's results in {failed_dir}"


def check_cache_root(cache_root: Path, inputs: list) -> None:
    """The cache exists (created if not) and lies clear of every input."""
    refuse_input_overlap(cache_root, inputs)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(cache_root, exc, "cannot create the pipeline cache") from exc


def check_bundle_target(bundle: Path, inputs: list, cache_root: Path) -> None:
    """The bundle is new, empty, or an earlier bundle (never some other directory), and
    neither holds nor lies inside an input or the cache."""
    check_output(bundle, [*inputs, cache_root], overwrite=True, directory=True)
    if bundle.is_dir() and any(bundle.iterdir()) and not (bundle / MANIFEST).is_file():
        raise BadInputError(f"{bundle}: exists and is not a pipeline bundle (no {MANIFEST}); choose another --out")


DEFAULT_JOBS = min(4, os.cpu_count() or 1)
SCRATCH = ".uncached"  # in the bundle being built: where steps that are never cached write
STEP_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # the threads steps run in


def steps_running() -> bool:
    """Whether a step is still running in one of its threads (after an interrupt: it cannot
    be stopped, and the interpreter's exit would kill it inside torch or ONNX Runtime)."""
    return any(thread.is_alive() for thread in list(STEP_THREADS))


class Runner:
    """Runs tasks as their inputs become ready, up to `jobs` at a time: from the cache
    when it holds them, else through their step.

    Steps run in worker threads (their stages release the GIL in numpy, ONNX Runtime and
    torch), except an exclusive task (bench), which runs on this thread with nothing else
    running, so a measurement never shares the cores with another step. Tasks of one
    serial group (torch) run one at a time. Records and log lines come out on this thread.
    """

    def __init__(
        self,
        cache: StepCache,
        hasher: Hasher,
        force: bool,
        echo: Callable[[str], None],
        jobs: int = DEFAULT_JOBS,
        executor: Callable[[Any, Path, dict], Outcome] | None = None,
    ):
        self.cache = cache
        self.executor = executor  # runs a step elsewhere (a Ray task); None: in this process
        self.hasher = hasher
        self.force = force
        self.echo = echo
        self.jobs = jobs
        self.tool = tool_version()
        self.machine = machine_key()
        self.entries: dict[int, Entry] = {}  # id(task) -> its entry (outputs for later tasks)
        self.input_files: dict[str, dict[str, str]] = {}  # input path -> {file: digest}
        self.scratch = itertools.count(1)
        self.staging: set[Path] = set()  # cache entries being written (by running steps)
        self.t0 = time.perf_counter()

    def run(self, tasks: list[Task], bundle: Path) -> list[StepRecord]:
        """Every task's record, in the plan's order (log lines in the order they end)."""
        records: dict[int, StepRecord] = {}
        waiting = list(tasks)
        running: dict[int, Task] = {}
        busy: set[str] = set()  # serial groups with a task running
        ended: queue.Queue = queue.Queue()
        self.t0 = time.perf_counter()

        def finish(task: Task, record: StepRecord) -> None:
            records[id(task)] = record
            self.echo(record.line(len(records), len(tasks)))
            for line in record.lines:
                self.echo(f"      {line}")

        def work(task: Task) -> None:
            try:
                record = self.run_task(task, bundle)
            except BaseException as exc:  # handed to this thread, which raises it
                ended.put((task, exc))
                return
            ended.put((task, record))

        try:
            while waiting or running:
                started = False
                for exclusive in (False, True):
                    for task in list(waiting):
                        if task.exclusive != exclusive or any(id(d) not in records for d in task.deps()):
                            continue
                        early = self.precheck(task, records)
                        if early is not None:
                            waiting.remove(task)
                            finish(task, early)
                            started = True
                            continue
                        if exclusive and not running:
                            waiting.remove(task)
                            finish(task, self.run_task(task, bundle))  # here, alone
                            started = True
                            break
                        if exclusive or len(running) >= self.jobs or task.serial in busy:
                            continue
                        waiting.remove(task)
                        running[id(task)] = task
                        if task.serial is not None:
                            busy.add(task.serial)
                        thread = threading.Thread(target=work, args=(task,), name=f"step {task.name}", daemon=True)
                        STEP_THREADS.add(thread)
                        thread.start()
                        started = True
                    if started:
                        break
                if started:
                    continue
                if not running:
                    raise InternalError(f"pipeline: {waiting[0].name} waits for a task that never runs")
                task, outcome = ended.get()
                del running[id(task)]
                busy.discard(task.serial)
                if isinstance(outcome, BaseException):
                    raise outcome
                finish(task, outcome)
        except BaseException:
            # Steps still running in their threads (an interrupt) cannot be stopped: their
            # unfinished cache entries go now, not at the next run with the same key.
            for tmp in list(self.staging):
                discard(tmp)
            raise
        finally:
            if (bundle / SCRATCH).exists():
                discard(bundle / SCRATCH)
        return [records[id(task)] for task in tasks]

    def precheck(self, task: Task, records: Mapping[int, StepRecord]) -> StepRecord | None:
        """The task's record when it cannot run: its target is unavailable, or a task it
        needs did not pass."""
        if task.skip is not None:
            return StepRecord(task, SKIPPED, detail=task.skip)
        blocked = [d for d in task.deps() if records[id(d)].status != PASSED]
        if blocked:
            dep = records[id(blocked[0])]
            return StepRecord(task, SKIPPED, detail=f"needs {dep.task.name}, which {dep.status}")
        return None

    def run_task(self, task: Task, bundle: Path) -> StepRecord:
        start = time.perf_counter()
        try:
            key = json_key(self.key_material(task))
        except LoraDeployError as exc:  # an input that cannot be read
            record = self.record(task, FAILED, start, None, {}, Outcome(""), error=str(exc))
            record.exit_code = exc.exit_code
            return record
        dest = bundle / task.dest
        entry = None if self.force or not task.cacheable else self.cache.lookup(task.step, key, self.hasher)
        if entry is not None:
            link_tree(entry.out, dest)
            self.entries[id(task)] = entry
            outcome = Outcome(entry.detail, entry.result, lines=entry.notes)
            return self.record(task, PASSED, start, key, entry.files, outcome, cached=True, first=entry.seconds)
        inputs = {role: self.resolve(value) for role, value in task.inputs.items()}
        try:
            if task.cacheable:
                with self.cache.staging(task.step, key) as tmp:
                    self.staging.add(tmp)
                    outcome, files = self.produce(task, tmp, inputs, dest)
                    created = report_header("")["created"]
                    seconds = time.perf_counter() - start
                    write_entry(tmp, key, outcome.detail, outcome.result, files, seconds, created, outcome.lines)
                self.staging.discard(tmp)
                entry = self.cache.lookup(task.step, key, self.hasher) or missing_entry(task)
            else:  # measured on every run: its outputs go to the bundle, not into the cache
                tmp = bundle / SCRATCH / str(next(self.scratch))
                tmp.mkdir(parents=True)
                outcome, files = self.produce(task, tmp, inputs, dest)
                entry = Entry(tmp, key, outcome.detail, outcome.result, files, time.perf_counter() - start)
        except StepProblem as problem:
            return self.record(task, FAILED, start, key, problem.files, problem.outcome, error=problem.outcome.problem)
        except LoraDeployError as exc:
            record = self.record(task, FAILED, start, key, {}, Outcome(""), error=str(exc))
            record.exit_code = exc.exit_code
            return record
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug in a stage: recorded, the rest of the run goes on
            message = f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            record = self.record(task, FAILED, start, key, {}, Outcome(""), error=message)
            record.exit_code = InternalError.exit_code
            return record
        self.entries[id(task)] = entry
        return self.record(task, PASSED, start, key, files, outcome)

    def produce(self, task: Task, tmp: Path, inputs: dict[str, Any], dest: Path) -> tuple[Outcome, dict[str, str]]:
        """Run the step into tmp/out and link its files into the bundle; a failed gate or
        verification raises StepProblem (its outputs are in the bundle, for diagnosis)."""
        out = tmp / "out"
        out.mkdir()
        if self.executor is not None and not task.exclusive:
            outcome = self.executor(task.produce, out, inputs)
        else:
            outcome = task.produce(out, inputs)
        files = {rel: self.hasher.file(out / rel) for rel in files_under(out)}
        link_tree(out, dest)
        if outcome.problem is not None:
            raise StepProblem(outcome, files)
        return outcome, files

    def record(self, task, status, start, key, files, outcome: Outcome, *, cached=False, first=None, error=None):
        dest = task.dest
        return StepRecord(
            task,
            status,
            seconds=time.perf_counter() - start,
            cached=cached,
            detail=outcome.detail,
            result=outcome.result,
            files={f"{dest}/{rel}": digest for rel, digest in files.items()},
            key=key,
            error=error,
            exit_code=1 if error is not None else None,
            lines=outcome.lines,
            first_seconds=first,
            started=start - self.t0,
        )

    def resolve(self, value: Any) -> Any:
        """A task input as the step receives it: an earlier task's output directory."""
        if isinstance(value, Task):
            return self.entries[id(value)].out
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def key_material(self, task: Task) -> dict[str, Any]:
        inputs = task.key_inputs if task.key_inputs is not None else task.inputs
        material = {
            "step": task.step,
            "unit_kind": "base" if task.unit == BASE else "adapter",
            "options": {k: self.digest(v) if isinstance(v, Path) else v for k, v in sorted(task.options.items())},
            "inputs": {role: self.digest(value) for role, value in sorted(inputs.items())},
            "tool": self.tool,
        }
        if task.machine_bound:
            material["machine"] = self.machine
        return material

    def digest(self, value: Any) -> Any:
        """The content digest an input contributes to a key."""
        if isinstance(value, Task):
            return tree_key(self.entries[id(value)].files)
        if isinstance(value, tuple) and value and value[0] == "layout":
            return adapter_layout(value[1], self.hasher)
        if isinstance(value, dict):
            return {k: self.digest(v) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [self.digest(v) for v in value]
        if isinstance(value, (str, os.PathLike)):
            return tree_key(self.input_digests(Path(value)))
        return value

    def input_digests(self, path: Path) -> dict[str, str]:
        real = str(path.resolve())
        if real not in self.input_files:
            if not path.exists():  # an option naming a file or directory the step creates (a timing cache)
                return {}
            try:
                self.input_files[real] = self.hasher.tree(path)
            except OSError as exc:
                raise BadInputError(f"{path}: unreadable ({exc.strerror or exc})") from exc
        return self.input_files[real]


class StepProblem(Exception):
    """A step ran and a gate or verification failed: its outputs go to the bundle, not
    into the cache."""

    def __init__(self, outcome: Outcome, files: dict[str, str]):
        super().__init__(outcome.problem)
        self.outcome = outcome
        self.files = files


def missing_entry(task: Task) -> Entry:
    raise OutputError(f"{task.name}: stored in the pipeline cache but not readable back")


def adapter_layout(adapter: Path, hasher: Hasher) -> str:
    """What a dynamic graph depends on in an adapter: its config and its tensors' names,
    dtypes and shapes (safetensors headers), not their values."""
    import json
    import struct

    parts: dict[str, Any] = {}
    for rel in files_under(adapter):
        file = adapter / rel
        if rel.endswith(".safetensors"):
            try:
                with open(file, "rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(size))
                parts[rel] = {k: [v.get("dtype"), v.get("shape")] for k, v in header.items() if k != "__metadata__"}
                continue
            except (OSError, ValueError, struct.error, AttributeError):
                pass  # not a readable header: its bytes then (the step itself will say what is wrong)
        if rel.endswith((".safetensors", ".json", ".bin", ".pt")):
            parts[rel] = hasher.file(file)
    return json_key(parts)


def machine_key() -> dict[str, Any]:
    """What ties a measurement or an engine to this machine."""
    from lora_deploy.bench.machine import machine_info

    info = machine_info()
    return {"cpu": info.get("cpu"), "cores": info.get("cores"), "gpu": info.get("gpu"), "node": platform.node()}
