"""The driver: validate, lock, resume, hand shards to Ray actors, commit them to the manifest.

Order of events (each step only after the previous one succeeded, so a bad request writes nothing
and starts no Ray):

1. resolve and validate the config; check the output is writable; if a manifest exists, check
   that it was made with the same config (read-only so far);
2. create the directory, take `.dfq.lock`, reconcile the directory with the manifest (drop
   shards that are missing or truncated, delete leftovers) and list the shards still to do;
3. start (or join, `address`) Ray, start one actor per GPU (or `workers` CPU actors), spread over
   the nodes, and hand out one shard per free actor; a finished shard, once the driver sees it at
   its final name, is added to the manifest, which is rewritten atomically; an actor that dies (or
   whose node leaves) has its shard requeued and is replaced, a bounded number of times; the
   replacement gets work once it is up, so the other actors carry on meanwhile;
4. delete temporary leftovers, write the final manifest, release the lock, return a summary.

Ray is imported only in step 3: `import engine` works without it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from engine.config import GenerateConfig
from engine.errors import EngineError, GenerationError
from engine.lock import PoolLock
from engine.manifest import (
    add_shard,
    check_same_config,
    load_manifest,
    new_manifest,
    reconcile,
    remove_temp_files,
    save_manifest,
)
from engine.writer import committed_size, is_local, join, local_path


def generate(cfg: GenerateConfig, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate (or resume) the pool described by `cfg`; returns a summary dict.

    `context` is handed to every worker's generator (components injected by the caller: e.g. the
    classifier factory of the bn-distill generator, which the CLI layer builds from `quant`).
    Raises EngineError for a bad request (nothing written), GenerationError when a started run
    cannot finish (committed shards stay valid; re-running resumes).
    """
    cfg = cfg.resolved()
    if is_local(cfg.out):
        cfg = dataclasses.replace(cfg, out=os.path.abspath(local_path(cfg.out)))
        check_output_dir(cfg.out)
    existing = load_manifest(cfg.out)
    if existing is not None:
        check_same_config(existing, cfg, cfg.out)

    t0 = time.perf_counter()
    if is_local(cfg.out):
        try:
            os.makedirs(cfg.out, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"cannot create output directory {cfg.out}: {exc.strerror}") from None
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(cfg.out)
        fs.makedirs(path, exist_ok=True)  # a no-op on object stores, needed on others (memory, sftp)
    lock = PoolLock(cfg.out) if is_local(cfg.out) else nullcontext()
    with lock, _os_errors_end_the_run(cfg.out):
        manifest = load_manifest(cfg.out)  # again, under the lock: another driver may have written it
        if manifest is None:
            manifest = new_manifest(cfg)
        else:
            check_same_config(manifest, cfg, cfg.out)
        manifest["stats"]["runtime"] = cfg.runtime_config()
        save_manifest(cfg.out, manifest)
        todo = reconcile(cfg.out, manifest)
        summary: dict[str, Any] = {
            "out": cfg.out,
            "num_samples": cfg.num_images,
            "shards_total": cfg.num_shards,
            "shards_skipped": cfg.num_shards - len(todo),
            "shards_written": 0,
            "images_written": 0,
            "actors": 0,
            "actor_restarts": 0,
            "workers": [],
            "nodes": [],
        }
        try:
            if todo:
                _run_on_ray(cfg, manifest, todo, summary, context or {})
        finally:
            remove_temp_files(cfg.out, cfg.prefix)
            save_manifest(cfg.out, manifest)
    wall = time.perf_counter() - t0
    summary.update(
        complete=manifest["complete"],
        images=manifest["stats"]["images"],
        rejected=manifest["stats"]["rejected"],
        wall_seconds=round(wall, 3),
        img_per_s=round(summary["images_written"] / wall, 3) if wall > 0 else 0.0,
    )
    return summary


@contextmanager
def _os_errors_end_the_run(out: str) -> Iterator[None]:
    """An OSError under the lock (the disk filled up, the output went away) ends the run as a
    GenerationError: one line for the CLI; what was committed stays committed."""
    try:
        yield
    except OSError as exc:
        raise GenerationError(
            f"{exc.strerror or exc} ({exc.filename or out}); committed shards are kept, "
            "fix the cause and re-run the same command to resume"
        ) from exc


def check_output_dir(out: str) -> None:
    """The output must be a directory we can write (or creatable below a writable parent)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise EngineError(f"output {out} exists and is not a directory")
    probe = out
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise EngineError(f"output {out} is not writable")


def format_summary(summary: dict[str, Any]) -> str:
    state = "complete" if summary["complete"] else "INCOMPLETE (re-run the same command to resume)"
    return (
        f"{summary['out']}: {summary['images']}/{summary['num_samples']} samples in "
        f"{summary['shards_total']} shards, {state}; this run wrote {summary['shards_written']} shards "
        f"({summary['images_written']} images, {summary['img_per_s']} img/s) on {summary['actors']} actors "
        f"({summary['actor_restarts']} restarted), skipped {summary['shards_skipped']} committed; "
        f"rejected {summary['rejected']} images; {summary['wall_seconds']} s"
    )


# ------------------------------------------------------------------------------------------ Ray
def _run_on_ray(
    cfg: GenerateConfig,
    manifest: dict[str, Any],
    todo: list[int],
    summary: dict[str, Any],
    extra_context: dict[str, Any],
) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm import tqdm

    from engine.generators import generator_spec, prepare_context
    from engine.worker import ShardWorker

    context = {**prepare_context(cfg), **extra_context}  # once per run, e.g. the similarity matrix
    started_ray = False
    if not ray.is_initialized():
        if cfg.address:
            ray.init(address=cfg.address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, cfg.workers or 1),
                include_dashboard=False,
                log_to_driver=False,
            )
        started_ray = True

    actors: list[Any] = []
    try:
        n_actors, options, device, threads = _actor_plan(cfg, ray.cluster_resources())
        n_actors = min(n_actors, len(todo))
        actor_cls = ray.remote(ShardWorker)
        context_ref = ray.put(context)

        def spawn() -> Any:
            actor = actor_cls.options(max_restarts=0, max_task_retries=0, **options).remote(
                cfg,
                context_ref,
                threads=threads,
                quiet=True,
                device=device,
                target=generator_spec(cfg.generator).factory,
            )
            actors.append(actor)
            return actor

        pending = deque(todo)
        free = [spawn() for _ in range(n_actors)]
        summary["actors"] = n_actors
        # ref -> (actor, shard); shard None marks a replacement actor's ready() probe: a replacement
        # gets work only once it runs, so a shard never waits on an actor the cluster cannot place
        # (its node left and no other has room) while the surviving actors could do it.
        inflight: dict[Any, tuple[Any, int | None]] = {}
        faulted = False
        workers: set[str] = set()
        nodes: set[str] = set()
        done_images = manifest["stats"]["images"]
        with tqdm(
            total=cfg.num_images,
            initial=done_images,
            unit="img",
            desc="dfq generate",
            disable=not cfg.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        ) as bar:
            # On a fatal error stop handing out work but let in-flight shards finish and commit:
            # their work is not wasted, and the partial pool is as complete as it can be.
            failure: Exception | None = None
            while (pending and failure is None) or any(s is not None for _, s in inflight.values()):
                while pending and free and failure is None:
                    actor, shard = free.pop(), pending.popleft()
                    fault = cfg.fault_shard == shard and not faulted
                    faulted = faulted or fault
                    inflight[actor.run_unit.remote(shard, fault)] = (actor, shard)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    actor, shard = inflight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayActorError as exc:
                        ray.kill(actor)
                        if exc.actor_init_failed:
                            failure = failure or _init_error(exc)
                            continue
                        where = "while starting" if shard is None else f"on shard {shard}"
                        summary["actor_restarts"] += 1
                        if summary["actor_restarts"] > cfg.max_actor_restarts:
                            failure = failure or GenerationError(
                                f"workers died {summary['actor_restarts']} times (limit {cfg.max_actor_restarts}); "
                                f"last {where}; re-run the same command to resume"
                            )
                            continue
                        if shard is not None:
                            pending.appendleft(shard)
                        replacement = spawn()
                        inflight[replacement.ready.remote()] = (replacement, None)
                        bar.write(
                            f"dfq generate: a worker died {where} (its node may have left); "
                            "requeued its shard and started a replacement"
                        )
                        continue
                    except RayTaskError as exc:
                        failure = failure or _task_error(exc, shard)
                        continue
                    if shard is None:  # a replacement is up
                        free.append(actor)
                        continue
                    if committed_size(join(cfg.out, result["url"])) != result["filesize"]:
                        failure = failure or GenerationError(
                            f"shard {shard} was committed by a worker on node {result.get('node')} but "
                            f"{join(cfg.out, result['url'])} is missing or of another size here: on a "
                            f"cluster, --out must be storage every node shares (a shared mount, s3://, gs://)"
                        )
                        continue
                    stats = {k: result.get(k) for k in ("rejected", "seconds", "worker", "node")}
                    add_shard(manifest, result, stats)
                    save_manifest(cfg.out, manifest)
                    workers.add(result["worker"])
                    nodes.add(result.get("node") or "")
                    summary["shards_written"] += 1
                    summary["images_written"] += result["nsamples"]
                    bar.update(result["nsamples"])
                    bar.set_postfix(shards=f"{len(manifest['shardlist'])}/{cfg.num_shards}", refresh=False)
                    free.append(actor)
        summary["workers"] = sorted(workers)
        summary["nodes"] = sorted(n for n in nodes if n)
        if failure is not None:
            raise failure
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass
        if started_ray:
            ray.shutdown()


def _actor_plan(
    cfg: GenerateConfig, resources: dict[str, float]
) -> tuple[int, dict[str, Any], str, int | None]:
    """(number of actors, Ray options, worker device, torch threads) for this cluster."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0):
        if gpus < 1:
            raise EngineError("device 'cuda' requested but the Ray cluster has no GPU")
        n = cfg.workers or gpus
        if n > gpus:
            print(
                f"dfq generate: {n} workers asked, the cluster has {gpus} GPUs: using {gpus}", file=sys.stderr
            )
            n = gpus
        return n, {"num_gpus": 1, "scheduling_strategy": "SPREAD"}, "cuda", None
    n = cfg.workers or 1
    if cpus and n > cpus:
        print(f"dfq generate: {n} workers asked, the cluster has {cpus} CPUs: using {cpus}", file=sys.stderr)
        n = cpus
    return n, {"num_cpus": 1, "num_gpus": 0, "scheduling_strategy": "SPREAD"}, "cpu", 1


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error:" in line or "Exception:" in line:
            return line
    return lines[-1] if lines else "unknown error"


def _init_error(exc: Exception) -> Exception:
    line = _last_error_line(str(exc))
    if "EngineError:" in line:
        return EngineError(line.split("EngineError:", 1)[1].strip())
    return GenerationError(f"a worker failed to start: {line}")


def _task_error(exc: Any, shard: int) -> Exception:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EngineError):
        return EngineError(str(cause))
    if isinstance(cause, GenerationError):
        return GenerationError(f"shard {shard}: {cause}")
    return GenerationError(f"shard {shard} failed: {_last_error_line(str(exc))}")
