"""The driver: validate, lock, resume, hand shards to Ray actors, commit them to the manifest.

Order of events (each step only after the previous one succeeded, so a bad request writes nothing
and starts no Ray):

1. resolve and validate the config; check the output is writable; if a manifest exists, check
   that it was made with the same config (read-only so far);
2. create the directory, take `.dfq.lock`, reconcile the directory with the manifest (drop
   shards that are missing or truncated, delete leftovers) and list the shards still to do;
3. start (or join, `address`) Ray, start one actor per GPU (or `workers` CPU actors), spread over
   the nodes, and hand out one shard per free actor (engine.schedule decides; this module only
   talks to Ray); a finished shard, once the driver sees it at its final name, is added to the
   manifest, which is rewritten atomically; an actor that dies (or whose node leaves) has its shard
   requeued and is replaced, a bounded number of times;
4. delete temporary leftovers, write the final manifest, release the lock, return a summary.

Ray is imported only in step 3: `import engine` works without it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from engine.config import GenerateConfig
from engine.errors import EngineError, GenerationError
from engine.generators import check_request
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
from engine.schedule import ShardSchedule
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
    check_request(cfg, context)

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
    """The Ray edge of the run: start actors, turn the schedule's assignments into remote calls and
    Ray's answers into schedule events (engine.schedule); commit each finished shard to the manifest."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from engine.generators import prepare_context

    context = {
        **prepare_context(cfg, extra_context),
        **extra_context,
    }  # once per run, e.g. the similarity matrix
    with _ray_session(cfg), _Actors(cfg, context) as actors, _progress_bar(cfg, manifest) as bar:
        n_actors = min(actors.count, len(todo))
        schedule = ShardSchedule(todo, cfg.max_actor_restarts, cfg.fault_shard)
        for _ in range(n_actors):
            schedule.add_actor(actors.spawn())
        summary["actors"] = n_actors
        inflight: dict[Any, Any] = {}  # object ref -> actor (one call per actor at a time)
        while schedule.running:
            for actor, shard, fault in schedule.assign():
                inflight[actor.run_unit.remote(shard, fault)] = actor
            if not inflight:  # the schedule never gets here; a hang would be worse than an error
                raise GenerationError("no worker is left to run the remaining shards")
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ref)
            shard = schedule.shard_of(actor)
            try:
                result = ray.get(ref)
            except RayActorError as exc:
                ray.kill(actor)
                if exc.actor_init_failed:
                    schedule.failed(actor, _init_error(exc))
                elif schedule.died(actor):
                    replacement = actors.spawn()
                    schedule.add_actor(replacement, ready=False)
                    inflight[replacement.ready.remote()] = replacement
                    where = "while starting" if shard is None else f"on shard {shard}"
                    bar.write(
                        f"dfq generate: a worker died {where} (its node may have left); "
                        "requeued its shard and started a replacement"
                    )
                summary["actor_restarts"] = schedule.restarts
                continue
            except RayTaskError as exc:
                schedule.failed(actor, _task_error(exc, shard))
                continue
            if shard is None:  # a replacement is up
                schedule.ready(actor)
                continue
            problem = _commit(cfg, manifest, result, summary)
            if problem is not None:
                schedule.failed(actor, problem)
                continue
            schedule.committed(actor)
            bar.update(result["nsamples"])
            bar.set_postfix(shards=f"{len(manifest['shardlist'])}/{cfg.num_shards}", refresh=False)
    if schedule.failure is not None:
        raise schedule.failure


def _commit(
    cfg: GenerateConfig, manifest: dict[str, Any], result: dict[str, Any], summary: dict[str, Any]
) -> Exception | None:
    """List a shard a worker committed, once the driver sees it at its final name with its size;
    returns the error instead when it does not (an output the nodes do not share)."""
    url = join(cfg.out, result["url"])
    if committed_size(url) != result["filesize"]:
        return GenerationError(
            f"shard {result['shard']} was committed by a worker on node {result.get('node')} but {url} is "
            "missing or of another size here: on a cluster, --out must be storage every node shares "
            "(a shared mount, s3://, gs://)"
        )
    add_shard(manifest, result, {k: result.get(k) for k in ("rejected", "seconds", "worker", "node")})
    save_manifest(cfg.out, manifest)
    summary["workers"] = sorted({*summary["workers"], result["worker"]})
    if result.get("node"):
        summary["nodes"] = sorted({*summary["nodes"], result["node"]})
    summary["shards_written"] += 1
    summary["images_written"] += result["nsamples"]
    return None


@contextmanager
def _ray_session(cfg: GenerateConfig) -> Iterator[None]:
    """Join `cfg.address`, or reuse the caller's Ray, or start a local one (shut down at the end)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, cfg.workers or 1), include_dashboard=False, log_to_driver=False
        )
    try:
        yield
    finally:
        ray.shutdown()


class _Actors:
    """Starts `ShardWorker` actors as the cluster allows (`_actor_plan`) and kills them all on exit."""

    def __init__(self, cfg: GenerateConfig, context: dict[str, Any]) -> None:
        import ray

        from engine.generators import generator_spec
        from engine.worker import ShardWorker

        self.count, self.options, self.device, self.threads = _actor_plan(cfg, ray.cluster_resources())
        self.cfg, self.target = cfg, generator_spec(cfg.generator).factory
        self.context_ref = ray.put(context)
        self.actor_cls = ray.remote(ShardWorker)
        self.started: list[Any] = []

    def spawn(self) -> Any:
        actor = self.actor_cls.options(max_restarts=0, max_task_retries=0, **self.options).remote(
            self.cfg,
            self.context_ref,
            threads=self.threads,
            quiet=True,
            device=self.device,
            target=self.target,
        )
        self.started.append(actor)
        return actor

    def __enter__(self) -> _Actors:
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        for actor in self.started:
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass


def _progress_bar(cfg: GenerateConfig, manifest: dict[str, Any]) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=cfg.num_images,
        initial=manifest["stats"]["images"],
        unit="img",
        desc="dfq generate",
        disable=not cfg.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )


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
