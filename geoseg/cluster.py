"""Connecting to Dask: the embedded ``LocalCluster`` or an existing scheduler.

``workers=N`` (``--workers N``) starts a ``LocalCluster`` of N worker processes (one thread
each); ``scheduler=ADDRESS`` (``--scheduler``, or ``DASK_SCHEDULER_ADDRESS``) connects to a
running cluster; ``client=`` uses a ``distributed.Client`` as it is. Dask workers start with
``OMP_NUM_THREADS=1``, so torch in a worker would use one thread; :func:`prepare` gives each
worker's tasks its share of the machine's cores instead (:func:`geoseg.tasks.torch_threads`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed import Client, KilledWorker, LocalCluster, as_completed, get_client
from distributed.comm import parse_address
from distributed.comm.registry import backends
from distributed.diagnostics.plugin import WorkerPlugin

# the config file of geoseg's Dask settings, for clusters started by hand (docs/cluster.md)
from geoseg.allocator import DASK_CONFIG as DASK_CONFIG
from geoseg.allocator import DASK_DEFAULTS, worker_malloc
from geoseg.errors import AsCaller, ClusterError, again, option
from geoseg.io import describe_window
from geoseg.progress import Progress
from geoseg.tasks import TORCH_THREADS, cuda_devices

log = logging.getLogger("geoseg")


_defaults_applied = False


def use_geoseg_defaults() -> None:
    """Make geoseg's Dask settings (``dask.yaml``) the defaults of this process: a value the user
    set (a config file, a ``DASK_*`` variable, ``dask.config.set``) keeps precedence."""
    global _defaults_applied
    # distributed, imported above, has set its own defaults: geoseg's go over them
    if not _defaults_applied:
        dask.config.update_defaults(DASK_DEFAULTS)
        _defaults_applied = True


def default_workers() -> int:
    """Worker processes for the embedded cluster: one per core, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


@contextlib.contextmanager
def session(
    workers: int | None = None,
    scheduler: str | None = None,
    *,
    client: Any = None,
    gpu: bool = False,
    small: bool = False,
) -> Iterator[Any]:
    """A ``distributed.Client`` for the duration of the block, the Dask way.

    ``client``, when given, is used as it is (and left open). Else ``scheduler`` (or
    ``DASK_SCHEDULER_ADDRESS`` in the environment) connects to that cluster, and ``workers``
    starts a local cluster of that many processes (one thread each). With none of these, the
    current client (``distributed.get_client()``, such as one the caller made) is used, and
    without one a local cluster is started for the block and closed after.

    ``gpu``: the work may use GPUs (device ``auto`` or ``cuda``). On a machine with GPUs the
    local cluster then has one worker per GPU by default, each declaring the ``GPU`` resource:
    dask-cuda's ``LocalCUDACluster`` when it is installed (``pip install 'geoseg[cuda]'``), which
    gives each worker its own GPU; else a ``LocalCluster``, whose workers all use the first GPU.

    ``small``: the work is a few seconds' (a small scene). When a local cluster would be started
    for it, and no GPU is asked for, it runs in this process instead (:func:`in_process`). Starting worker processes, importing torch
    in each and loading the model there would cost more than the work.
    """
    address = scheduler_address(scheduler, workers) if client is None else None
    client = chosen_client(client, workers, address)
    if client is not None:
        if workers is not None or scheduler:
            log.warning("workers= and scheduler= are ignored with a client")
        with client.as_current():  # Dask's helpers (wait, as_completed) use this client
            yield prepare(client)
        return
    if address:
        if workers is not None:
            log.warning(
                "%s is ignored with %s", option("--workers", None), option("--scheduler", address)
            )
        with connect(address) as client, client.as_current():
            yield prepare(client)
        return
    if small and workers is None and not (gpu and cuda_devices()):
        with in_process() as client, client.as_current():
            yield client
        return
    with local_cluster(workers, gpu=gpu) as client, client.as_current():
        yield client


_NO_DASHBOARD: weakref.WeakSet[Any] = weakref.WeakSet()
"""Clients of clusters made without a dashboard (:func:`in_process`)."""


def dashboard_link(client: Any) -> str | None:
    """The link to the dashboard of ``client``'s cluster; None for a cluster in this process,
    which has none (its client still offers a link, to a page that is not there)."""
    if client in _NO_DASHBOARD:
        return None
    return getattr(client, "dashboard_link", None)


@contextlib.contextmanager
def in_process() -> Iterator[Any]:
    """A client of a Dask cluster in this process: one worker with a thread per core (at most
    8), whose tasks give torch their share of the cores (``GEOSEG_TORCH_THREADS`` and torch's
    threads are restored after). It starts in a fraction of a second, and the tasks share this process's imports
    and model. Torch releases the GIL while it computes, so the threads run the model side by
    side: measured on 2 cores, a 4096² scene ran at 0.98 of the model alone, as 2 worker
    processes do (one thread with both cores for torch: 0.75). The allocator is set as the
    workers' is while it runs (:func:`worker_malloc`)."""
    use_geoseg_defaults()
    saved = os.environ.get(TORCH_THREADS)
    torch = sys.modules.get("torch")  # the tasks set its threads for the whole process
    torch_saved = torch.get_num_threads() if torch is not None else None
    threads = default_workers()
    os.environ[TORCH_THREADS] = str(max(1, (os.cpu_count() or 1) // threads))
    try:
        with worker_malloc(), dask.config.set({"logging.distributed": "error"}):
            cluster = LocalCluster(
                processes=False,
                n_workers=1,
                threads_per_worker=threads,
                dashboard_address=None,
                # no dashboard, but the scheduler's web server still starts: on a free port of
                # this machine's loopback, not on Dask's 8787 for all to see
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                silence_logs=logging.ERROR,
            )
            with cluster, Client(cluster) as client:
                _NO_DASHBOARD.add(client)
                log.info(
                    "small enough to run in this process: one Dask worker, %d threads", threads
                )
                yield client
    finally:
        if saved is None:
            os.environ.pop(TORCH_THREADS, None)
        else:
            os.environ[TORCH_THREADS] = saved
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(torch_saved or os.cpu_count() or 1)


@contextlib.contextmanager
def local_cluster(
    workers: int | None = None, *, gpu: bool = False, set_as_default: bool = True
) -> Iterator[Any]:
    """A client of a new local cluster with geoseg's settings, closed after the block:
    ``workers`` processes of one thread each (default: one per core, at most 8; with ``gpu``
    on a machine with GPUs, one per GPU; see :func:`session`). ``set_as_default=False``: the
    client does not become the process's current one (``distributed.get_client()``)."""
    gpus = cuda_devices() if gpu else 0
    n = workers or gpus or default_workers()
    if n < 1:
        raise ClusterError(f"{option('--workers', None)} must be at least 1, got {n}")
    use_geoseg_defaults()
    config = {
        "logging.distributed": "error",
        # Ctrl-C reaches the workers too: they ignore it, and the client stops them
        "distributed.worker.preload": ["geoseg.worker_preload"],
        # the nanny's config rather than env=, which dask-cuda replaces with its own
        f"distributed.nanny.environ.{TORCH_THREADS}": str(max(1, (os.cpu_count() or 1) // n)),
    }
    with dask.config.set(config):
        cluster = _local_cluster(n, gpus)
        try:
            with Client(cluster, set_as_default=set_as_default) as client:
                log.debug("local Dask cluster: %d worker processes", n)
                yield prepare(client)
        finally:
            _close(cluster)


_DASK_LOGGERS = ("distributed", "tornado", "asyncio")


def _close(cluster: Any) -> None:
    """Close a local cluster this process started, Dask's logs held back meanwhile: after an
    error or Ctrl-C it closes with tasks still running, which is no news. A close that trips
    over a worker its nanny is starting again (after one died, killed for memory say,
    distributed asserts "can only join a started process", about 1 close in 10 of a 2-core
    machine under load) is logged, not raised: the run's own result or error is what the user
    reads, not Dask's traceback; the worker processes end with this process."""
    # and their children that Dask gives levels of their own (tornado.application: error)
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in _DASK_LOGGERS]
    loggers = [logging.getLogger(name) for name in {*_DASK_LOGGERS, *names}]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        cluster.close()
    except AssertionError as exc:
        log.debug("the local Dask cluster did not close cleanly: %s", exc)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def chosen_client(client: Any, workers: int | None, address: str | None) -> Any:
    """The client a stage runs on without making one: ``client`` when given, else the
    current one when neither ``workers`` nor a scheduler ``address`` asks for another; None
    when a cluster must be connected to or started (:func:`session`)."""
    if client is None and workers is None and not address:
        return current_client()
    return client


def current_client() -> Any:
    """The client this process uses by default (the last one made, unless told otherwise), or
    None."""
    try:
        return get_client()
    except ValueError:  # no client in this process
        return None


def _local_cluster(n: int, gpus: int) -> Any:
    common: dict[str, Any] = {
        "n_workers": n,
        "threads_per_worker": 1,
        "dashboard_address": ":0",
        "silence_logs": logging.ERROR,
    }
    if not gpus:
        return LocalCluster(processes=True, **common)
    common["resources"] = {GPU: 1}
    common["threads_per_worker"] = GPU_BLOCKS
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    if LocalCUDACluster is not None and n <= gpus:
        return LocalCUDACluster(**common)
    if gpus > 1:
        log.warning(
            "%d local workers on %d GPUs share the first GPU; for one worker per GPU install "
            f"dask-cuda (pip install 'geoseg[cuda]') and leave {option('--workers', None)} at its default",
            n,
            gpus,
        )
    return LocalCluster(processes=True, **common)


def scheduler_address(scheduler: str | None, workers: int | None = None) -> str | None:
    """The running cluster to use: ``scheduler``, else ``DASK_SCHEDULER_ADDRESS``, else the
    cluster kept by ``geoseg cluster start`` (unless ``workers`` asks for a local cluster or
    this process has a client of its own), else None (a local cluster)."""
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address or workers is not None or current_client() is not None:
        return address or None
    from geoseg import resident

    kept = resident.find()
    if kept is None:
        return None
    if kept.address not in _told:
        _told.add(kept.address)
        log.info(
            "on the cluster kept at %s by 'geoseg cluster start' (%d workers); "
            "'geoseg cluster stop' stops it",
            kept.address,
            kept.workers,
        )
    return kept.address


_told: set[str] = set()  # the kept clusters whose use was said in a log line


CONNECT_TIMEOUT = "geoseg.connect-timeout"
"""Dask config key: how long the first contact with a running scheduler may take (``5s``)."""


def connect(address: str) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address``, or one clear error. A
    scheduler that does not answer is reported after ``geoseg.connect-timeout`` (5 s by
    default; Dask itself would retry for 30 s)."""
    _check_address(address)
    timeout = dask.config.get(CONNECT_TIMEOUT, "5s")
    try:
        return Client(address, timeout=timeout)
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address!r} ({exc}); start one with "
            f"'dask scheduler', or {_local_instead(address)}"
        ) from None


def _local_instead(address: str) -> str:
    """How to use a local cluster instead: drop --scheduler, or unset the variable it came
    from."""
    if os.environ.get("DASK_SCHEDULER_ADDRESS") == address:
        return "unset DASK_SCHEDULER_ADDRESS (it names this address) to use a local cluster"
    return f"drop {option('--scheduler', None)} to use a local cluster"


def _check_address(address: str) -> None:
    """Refuse an address with no port, or a scheme Dask does not know, in one line."""
    try:
        scheme, location = parse_address(address)
        ok = scheme in backends and (scheme == "inproc" or location.rpartition(":")[2].isdigit())
    except ValueError:
        ok = False
    if not ok:
        raise ClusterError(
            f"{address!r} is not a Dask scheduler address; expected tcp://HOST:PORT such as "
            f"tcp://10.0.0.5:8786 (what 'dask scheduler' prints); or {_local_instead(address)}"
        )


def workers_info(client: Any) -> dict[str, Any]:
    """Every worker of the cluster, by address, asked of the scheduler now.

    Not ``client.scheduler_info()``: it refreshes the client's cached identity and returns the
    cache, which the client's own periodic refresh replaces with one that lists no worker (it
    asks for ``n_workers=0``). A refresh landing between the two made a training run report a
    worker "lost" that was running. Some releases list only five workers unless asked for all
    (``n_workers=-1``)."""
    try:
        info = client.sync(client.scheduler.identity, n_workers=-1)
    except TypeError:  # a release before the argument
        info = client.sync(client.scheduler.identity)
    return dict(info["workers"])


def count_workers(address: str) -> int:
    """The number of workers of the cluster at ``address`` now."""
    with connect(address) as c:
        return len(workers_info(c))


GPU = "GPU"  # the Dask worker resource that --device cuda tasks ask for

GPU_BLOCKS = 2
"""Block tasks a GPU worker runs at once (given as many threads): while one block's model
runs, the other's block is read, or its parts written. Their models take turns on the GPU
(:func:`geoseg.tasks.predict.gpu_turn`)."""


def task_resources(client: Any, device: str, *, blocks: bool = False) -> dict[str, float] | None:
    """The Dask resources a task on ``device`` asks for: for ``cuda`` a ``GPU`` (refused with a
    clear message when no worker declares one), a share of one for ``blocks`` of a prediction
    (:data:`GPU_BLOCKS` run on a GPU at once); none otherwise."""
    if device != "cuda":
        return None
    workers = workers_info(client).values()
    if not any(w.get("resources", {}).get(GPU, 0) >= 1 for w in workers):
        raise ClusterError(
            f"{option('--device', 'cuda')}: no Dask worker declares a GPU; start workers on GPU "
            f"machines with 'dask worker ADDRESS --resources GPU=1', or use "
            f"{option('--device', 'auto')}"
        )
    return {GPU: 1 / GPU_BLOCKS if blocks else 1}


def cpu_workers(client: Any) -> list[str] | None:
    """The workers without a GPU, when the cluster has workers of both kinds: CPU-only tasks
    (reading, polygons, metrics) go there and leave the GPUs to the model. ``None`` (any
    worker) when all workers are of one kind."""
    workers = workers_info(client)
    cpu = [a for a, w in workers.items() if not w.get("resources", {}).get(GPU, 0)]
    return cpu if cpu and len(cpu) < len(workers) else None


class _TorchThreads(WorkerPlugin):
    """A Dask worker plugin: on every worker, now and joining later, torch gets the worker's
    share of its machine's cores (``GEOSEG_TORCH_THREADS``), unless that is set already (the
    local cluster sets it through the nanny)."""

    name = "geoseg-torch-threads"
    idempotent = True

    def setup(self, worker: Any) -> None:
        if not os.environ.get(TORCH_THREADS):
            share = (os.cpu_count() or 1) // max(1, worker.state.nthreads)
            os.environ[TORCH_THREADS] = str(max(1, share))


def prepare(client: Any) -> Any:
    """Make ``client``'s cluster ready for geoseg's tasks (:class:`_TorchThreads` on every
    worker); return the client."""
    client.register_plugin(_TorchThreads(), name=_TorchThreads.name)
    return client


@dataclass(frozen=True)
class FollowUp:
    """Short tasks that each need some of :func:`run_tasks`' items finished first (a mosaic
    block's composite needs the scene blocks under it): ``fn(item, **kwargs)`` for every item,
    submitted as soon as the items it ``needs`` (indexes into run_tasks' items) are done, so it
    runs while later items still run instead of after the last. They keep to CPU workers
    where the cluster has others."""

    fn: Callable[..., Any]
    items: Sequence[Any]
    needs: Sequence[set[int]]
    pixels: Sequence[int] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def run_tasks(
    client: Any,
    fn: Callable[..., Any],
    items: Sequence[Any],
    label: str,
    *args: Any,
    unit: str = "blocks",
    pixels: Sequence[int] | None = None,
    resources: dict[str, float] | None = None,
    cpu_only: bool = False,
    paced: bool = False,
    then: FollowUp | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(item, *args, **kwargs)`` for every item on the cluster, showing progress (with
    throughput when ``pixels`` gives each item's size); return the results in ``items``' order,
    followed by those of ``then``'s items in theirs.
    ``cpu_only`` tasks keep off GPU workers where the cluster has others (:func:`cpu_workers`).

    ``paced`` (for tasks of seconds or more, such as predicting a block): the client hands out
    one task per worker thread that may run it, in the order of ``items``, and the next as each
    finishes. Dask would otherwise give every worker its share of a small graph at once, in no
    particular order (it queues tasks on the scheduler only for large groups), and a worker
    that finished early would wait while another still held two blocks. Short tasks are all
    submitted at once: a round trip per task would cost more than it saves. ``then``'s tasks
    are submitted as their items finish, outside the pacing (they are short, and Dask runs
    them before the items handed out after them).
    """

    where = cpu_workers(client) if cpu_only else None
    extra = list(then.items) if then else []
    results: list[Any] = [None] * (len(items) + len(extra))
    index: dict[Any, int] = {}  # items in flight
    follow: dict[Any, int] = {}  # follow-ups in flight, by their place in ``results``
    todo = iter(range(len(items)))
    running = as_completed(loop=client.loop)  # the client given, not the default one
    task = AsCaller(fn)  # messages raised on a worker name options as the caller does
    waiting = {j: set(n) for j, n in enumerate(then.needs)} if then else {}
    then_where = cpu_workers(client) if then else None  # asked once, not per follow-up

    def release(done: int | None) -> None:
        """Submit the follow-ups whose items are all done (``done`` just finished)."""
        assert then is not None
        ready = []
        for j, needs in waiting.items():
            if done is not None:
                needs.discard(done)
            if not needs:
                ready.append(j)
        for j in ready:
            del waiting[j]
            fut = client.submit(
                AsCaller(then.fn), extra[j], pure=False, workers=then_where, **then.kwargs
            )
            follow[fut.key] = len(items) + j
            running.add(fut)

    def feed(slots: int) -> None:
        while len(index) < slots:
            i = next(todo, None)
            if i is None:
                return
            fut = client.submit(
                task, items[i], *args, pure=False, resources=resources, workers=where, **kwargs
            )
            index[fut.key] = i
            running.add(fut)

    if then:
        release(None)  # follow-ups whose items an earlier run finished
    if paced:
        slots, counted = worker_slots(client, resources, where), time.monotonic()
        feed(slots)
    else:
        futures = client.map(
            task,
            items,
            *[[a] * len(items) for a in args],
            pure=False,
            resources=resources,
            workers=where,
            **kwargs,
        )
        index = {f.key: i for i, f in enumerate(futures)}
        running.update(futures)
    sizes = [*(pixels or [0] * len(items)), *((then.pixels if then else None) or [0] * len(extra))]
    with Progress(label, len(results), unit) as progress:
        for fut in running:
            i = follow.pop(fut.key) if fut.key in follow else index.pop(fut.key)
            results[i] = task_result(
                fut, label, (items[i] if i < len(items) else extra[i - len(items)])
            )
            progress.update(pixels=sizes[i])
            if then and i < len(items):
                release(i)
            if paced:
                if time.monotonic() - counted > 2:  # workers come and go on a real cluster
                    slots, counted = worker_slots(client, resources, where), time.monotonic()
                feed(slots)
    if waiting:  # a follow-up that needs an item not given: a caller's mistake
        raise ValueError(f"follow-ups {sorted(waiting)} need items that were never run")
    return results


def worker_slots(client: Any, resources: dict[str, float] | None, where: list[str] | None) -> int:
    """Tasks with these ``resources`` and ``where`` restriction that the workers run at once:
    each worker's threads, or fewer where its resources hold fewer such tasks (a GPU worker of
    several threads runs one task that asks for its GPU)."""
    n = 0
    for address, w in workers_info(client).items():
        have = w.get("resources", {})
        if where is not None and address not in where:
            continue
        fits = [int(have.get(k, 0) / v + 1e-9) for k, v in (resources or {}).items() if v > 0]
        n += min([int(w.get("nthreads", 1)), *fits])
    return max(1, n)


def model_slots(client: Any, device: str) -> int:
    """Models that run at once on the cluster for tasks on ``device``: one per GPU worker (its
    block tasks take turns with the model), one per thread of any other worker they may use."""
    n = 0
    for w in workers_info(client).values():
        gpu = w.get("resources", {}).get(GPU, 0) >= 1
        if device == "cuda" and not gpu:
            continue  # its tasks ask for a GPU
        n += 1 if gpu and device != "cpu" else int(w.get("nthreads", 1))
    return max(1, n)


def task_result(future: Any, label: str, item: Any) -> Any:
    """``future.result()``, with Dask giving up on a task whose workers kept dying turned into
    one clear line that names the task's item (a block) and what to do."""
    try:
        return future.result()
    except KilledWorker:
        pass  # raised outside the handler: Dask's long message need not travel with ours

    deaths = dask.config.get("distributed.scheduler.allowed-failures") + 1
    rerun = f"; {again()} run again keeps the finished blocks" if label == "predict" else ""
    raise ClusterError(
        f"{label}: the workers running {_describe(item)} died {deaths} "
        f"time{'s' if deaths != 1 else ''}, so Dask gave up on it; if they ran out of memory, "
        f"use a smaller {option('--block', None)} or give the workers more memory "
        f"('dask worker --memory-limit'){rerun}"
    )


def _describe(item: Any) -> str:
    """A block (a job with a ``core`` window, or the window itself) by its rows and columns."""
    core = getattr(item, "core", item)
    if not hasattr(core, "row_off"):
        return f"task {item!r}"
    return f"the block at {describe_window(core)}"
