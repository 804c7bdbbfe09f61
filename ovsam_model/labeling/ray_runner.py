"""The labeling engine on a Ray cluster: `ovsam label --ray`, `label_images(..., ray=...)`.

The engine is driven, not copied. The driver builds an ordinary `Labeler` (prompts read and
checked, the run's images, the resume fingerprint, the part file) and Ray Data does the labeling:

    rows           one per batch of `batch_size` images: their records and their kept prompts
    → decode       CPU tasks (`--ray-cpus-per-decoder` each): `loader.load_image` with the source's
                   `preparer`, exactly what the DataLoader workers of a plain run do
    → label        actors (`map_batches` with a class: one model per actor, `--ray-actors` of them,
                   `--ray-gpus-per-actor` GPUs each, or CPU actors where there is no GPU):
                   `engine.label_loaded`, the body of `Labeler.entries()`, on each batch
    → blocks       the entries of each batch come back to the driver as they finish and are
                   appended to the run's part file (`parts.PartWriter`, fsynced per block)
    → output       `Labeler.run` streams the part file into any output format (`merge_parts`)

So a finished block is never recomputed: it is in the part file, which `--resume` reads, and the
part file is the one a plain run writes (same name, same fingerprint: a Ray run can be resumed
without Ray and the other way round). Ray retries what dies: Ray Data restarts a dead actor and
retries its batches (its actor pools' `max_restarts` and `max_task_retries` are -1, without
limit), and Ray retries the task of a dead decoding worker (`max_retries` -1); a block that still
arrived twice is written once. Ray Data 2.60 has no supported way to bound those retries: only
`map_batches(..., max_restarts=N, max_task_retries=M)`, whose `**ray_remote_args` are deprecated
and removed in 2.64 (`DataContext.max_map_retries` and `actor_task_retry_on_errors` cover user
exceptions, `max_consecutive_actor_init_deaths` deaths while building the model, which fail the
run at once by default). So a batch that kills its actor every time is retried while other
batches progress, and ends the run once nothing else does, through Ray Data's no-progress guard
(`DataContext.execution_no_progress_timeout_s`, 30 minutes; `_one_line_failures` says so in
one line).

Images, `--boxes`/`--points` files and `--ann` are local paths or URIs (`ovsam_model.io.uris`:
object storage through fsspec): the driver reads the prompts and `--ann`, the decode tasks read
the images, so local paths must be on a file system every node sees at the same path, and URIs
need their protocol's package and credentials on every node (a local Ray instance's workers
inherit the driver's environment). The output is written where the driver runs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import socket
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

from ovsam_model.io.detections import InputError, PromptSet

from .engine import LabelEvents, Labeler, label_loaded
from .records import Entry

if TYPE_CHECKING:
    from .api import ModelSettings

DEFAULT_CLIENT_PORT = 10001  # ray://HOST without a port
DEFAULT_GCS_PORT = 6379  # HOST without a port
CONNECT_TIMEOUT_S = 5.0
MAX_INPUT_BLOCKS = 10_000  # input blocks of the dataset (rows are batches; a block holds one or more)


@dataclass
class RaySettings:
    """Where and how a run uses Ray.

    address: None starts a local Ray instance (or uses the one this process already started);
    "auto" joins the cluster this machine is part of (`ray start`); "HOST:PORT" its GCS;
    "ray://HOST:PORT" through Ray Client. actors: predictor actors (default: one per GPU, or one
    per 8 CPUs without GPUs); gpus_per_actor (default 1 where the cluster has GPUs, else 0: CPU
    actors); cpus_per_actor (default 1 with GPUs, less where CPUs are fewer; without GPUs, half the
    CPUs shared by the actors; also the actor's torch threads);
    cpus_per_decoder: CPUs of each image decoding task. progress: Ray Data's progress (bars on a
    terminal, log lines otherwise). worker_logs: the workers' output printed here (Ray's
    `log_to_driver`; `ovsam label` turns it off when the labels go to standard output).
    """

    address: Optional[str] = None
    actors: Optional[int] = None
    gpus_per_actor: Optional[float] = None
    cpus_per_actor: Optional[float] = None
    cpus_per_decoder: float = 1.0
    progress: bool = True
    worker_logs: bool = True


def ray_settings(ray: Union[bool, str, RaySettings, None]) -> Optional[RaySettings]:
    """`ray=` of the Python API: False/None (no Ray), True (a local Ray), an address, or settings."""
    if ray is None or ray is False:
        return None
    if ray is True:
        return RaySettings()
    if isinstance(ray, str):
        return RaySettings(address=ray)
    if isinstance(ray, RaySettings):
        return ray
    raise InputError(f"ray= takes True, an address or a RaySettings, got {type(ray).__name__}")


def check_settings(settings: RaySettings) -> None:
    """Option values that are wrong whatever the cluster (one-line `InputError`s)."""
    if settings.actors is not None and settings.actors < 1:
        raise InputError(f"--ray-actors must be at least 1, got {settings.actors}")
    for name, value in (("--ray-gpus-per-actor", settings.gpus_per_actor),
                        ("--ray-cpus-per-actor", settings.cpus_per_actor),
                        ("--ray-cpus-per-decoder", settings.cpus_per_decoder)):
        if value is not None and value < 0:
            raise InputError(f"{name} must not be negative, got {value}")
    if settings.cpus_per_actor == 0 and settings.gpus_per_actor == 0:
        raise InputError("--ray-cpus-per-actor 0 with --ray-gpus-per-actor 0 gives the actors nothing to run on")
    if settings.address is not None and not settings.address.strip():
        raise InputError("--ray-address is empty")


def check_address(address: Optional[str]) -> None:
    """Fail in one line, within seconds, when a HOST:PORT or ray://HOST:PORT address does not
    answer (Ray itself retries for a minute or more). "auto" and None are left to Ray."""
    if address is None or address == "auto":
        return
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        port_number = int(port) if port else (DEFAULT_CLIENT_PORT if client else DEFAULT_GCS_PORT)
    except ValueError:
        raise InputError(f"--ray-address {address}: the port {port!r} is not a number") from None
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, port_number), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise InputError(f"--ray-address {address}: no Ray cluster answers at {host}:{port_number} "
                         f"({exc.strerror or type(exc).__name__})") from None


def connect(settings: RaySettings) -> bool:
    """Connect this process to Ray; True when it started a local instance (to shut down at the
    end). A Ray already initialised in this process is used as it is."""
    check_address(settings.address)
    import ray

    if ray.is_initialized():
        return False
    quiet = not settings.progress
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING if quiet else logging.INFO,
                              "log_to_driver": settings.worker_logs and not quiet}
    if settings.address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=settings.address, **kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, grpc errors ...
        where = settings.address or "a local Ray instance"
        text = str(exc).strip().splitlines()
        raise InputError(f"--ray: cannot connect to {where} ({text[0] if text else type(exc).__name__})") from None
    return settings.address is None


@dataclass
class Plan:
    """The resources of a run, from the settings and the cluster's resources."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    cpus_per_decoder: float
    device: str  # of the actors' models: "cuda" or "cpu"

    def describe(self) -> str:
        what = f"{self.gpus_per_actor:g} GPU + {self.cpus_per_actor:g} CPU" if self.gpus_per_actor else \
            f"{self.cpus_per_actor:g} CPU"
        return (f"{self.actors} predictor actor{'s' if self.actors != 1 else ''} ({what} each), image decoding "
                f"in tasks of {self.cpus_per_decoder:g} CPU")


def plan(settings: RaySettings, resources: dict[str, float], *, device: str = "auto", strict: bool = True) -> Plan:
    """Resources per actor and the number of actors (`ray.cluster_resources()` gives
    `resources`). `device` "cpu" asks for CPU actors. `strict` (a local instance): refuse what
    cannot run here; on a cluster that may scale up, say so only."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpus_per_actor = settings.gpus_per_actor
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 and device != "cpu" else 0.0
    if gpus_per_actor:
        actors = settings.actors or max(1, int(gpus // gpus_per_actor))
        cpus_per_actor = settings.cpus_per_actor if settings.cpus_per_actor is not None else \
            min(1.0, max(0.25, (cpus - settings.cpus_per_decoder) / actors))  # a fraction where CPUs are few
    else:
        actors = settings.actors or max(1, int(cpus // 8))
        cpus_per_actor = settings.cpus_per_actor if settings.cpus_per_actor is not None else \
            float(max(1, int(cpus // 2 // actors)))
    result = Plan(actors, gpus_per_actor, cpus_per_actor, settings.cpus_per_decoder, "cuda" if gpus_per_actor else "cpu")
    problems = []
    if gpus_per_actor and actors * gpus_per_actor > gpus:
        problems.append(f"{actors} actors × {gpus_per_actor:g} GPU need {actors * gpus_per_actor:g} GPUs; "
                        f"the cluster has {gpus:g} (--ray-actors, --ray-gpus-per-actor)")
    if actors * cpus_per_actor + settings.cpus_per_decoder > cpus:
        problems.append(f"{actors} actors × {cpus_per_actor:g} CPU and one decoding task of "
                        f"{settings.cpus_per_decoder:g} CPU need {actors * cpus_per_actor + settings.cpus_per_decoder:g} "
                        f"CPUs; the cluster has {cpus:g} (--ray-actors, --ray-cpus-per-actor, --ray-cpus-per-decoder)")
    if problems and strict:
        raise InputError(problems[0])
    for problem in problems:
        logging.getLogger("ovsam").warning("%s: waiting for the cluster to scale up", problem)
    return result


def _lean_source(source: Any) -> Any:
    """The source as the actors need it (`label_batch`, `count`, `skip_count` on the prompts the
    rows carry), without the input records it read: those stay on the driver."""
    lean = copy.copy(source)
    for name in ("_raw", "records"):  # what a records source (boxes, points) holds of its input
        if name in vars(lean):
            setattr(lean, name, None)
    return lean


class RayLabeler(Labeler):
    """A `Labeler` whose `run` labels on Ray (see the module's docstring). The driver's
    `predictor` gives the vocabulary and the fingerprint; the actors build their own from
    `model` and `vocabulary` (or unpickle `predictor_ref`, a predictor put in the object store).

    `entries()` still labels in this process, with the driver's CPU copy of the model.

    After a run: `workers` counts the blocks each actor process (pid) labeled, `decoders` those
    each decoding worker decoded, `duplicates` the images that arrived twice and were written
    once, and `seconds` the time of the engine's work in the actors ("label"), of the actors'
    calls ("actor call": plus unpickling the rows, JSON of the entries), of pickling the decoded
    images ("decoder pickle") and of reading the entries back here ("driver"): what Ray costs on
    top of the labeling itself.
    """

    def __init__(self, predictor: Any, images: Any, source: Any, *, ray_plan: Plan, ray_settings: RaySettings,
                 model: Optional["ModelSettings"], vocabulary: Any, predictor_ref: Any = None, started: bool = False,
                 **labeler_options: Any) -> None:
        super().__init__(predictor, images, source, **labeler_options)
        self.ray_plan = ray_plan
        self.ray_settings = ray_settings
        self.model_settings = model
        self.vocabulary = vocabulary
        self.predictor_ref = predictor_ref
        self.started_ray = started
        self.workers: Counter = Counter()
        self.decoders: Counter = Counter()
        self.seconds: Counter = Counter()
        self.duplicates = 0

    def run(self, out: Any, fmt: Any = "results", *, resume: bool = False, rank: int = 0, world: int = 1) -> Any:
        if world > 1:
            raise InputError("--ray runs one driver: not with several ranks (torchrun, --devices)")
        try:
            return super().run(out, fmt, resume=resume)
        finally:
            self.close()

    def close(self) -> None:
        """Shut down the local Ray instance this run started (a joined cluster is left alone)."""
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False

    # --- the pipeline ------------------------------------------------------------------------

    def _rows(self, image_ids: Sequence[int]) -> list[dict]:
        records = [r for r in (self.images.get(i) for i in image_ids) if r is not None]
        rows = []
        for start in range(0, len(records), self.batch_size):
            chunk = records[start:start + self.batch_size]
            task = [(record, self.prompts.by_image.get(record.id, [])) for record in chunk]
            rows.append({"block": start // self.batch_size, "task": pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)})
        return rows

    def dataset(self, image_ids: Sequence[int]) -> Any:
        """The Ray Data pipeline labeling `image_ids`: rows of {block, entries (JSON), skipped
        (JSON [[image_id, message], ...]), pid (of the actor), decoder (pid)}, one per batch."""
        import ray

        rows = self._rows(image_ids)
        p = self.ray_plan
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), MAX_INPUT_BLOCKS)))
        # a flat_map (it may change the number of rows) is not fused into a map_batches with a batch
        # size, as a map would be: the decoding stays in CPU tasks of its own, overlapped with the model
        ds = ds.flat_map(_decode_row, fn_kwargs={"prepare": self.source.preparer(self.predictor), "exif": self.exif},
                         num_cpus=p.cpus_per_decoder)
        actor_args = {"model": None if self.model_settings is None else replace(self.model_settings, device=p.device),
                      "vocabulary": self.vocabulary, "predictor_ref": self.predictor_ref,
                      "source": _lean_source(self.source), "label_source": self.label_source,
                      "threads": max(1, int(p.cpus_per_actor))}
        # Ray Data's actor pools restart a dead actor and retry its batches (max_restarts and
        # max_task_retries -1 by default): a killed or preempted actor costs its batches in flight
        return ds.map_batches(PredictorActor, fn_constructor_kwargs=actor_args, batch_size=1, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=p.actors), num_gpus=p.gpus_per_actor or None,
                              num_cpus=p.cpus_per_actor)

    def label_blocks(self, image_ids: Sequence[int]) -> Iterator[list[Entry]]:
        """The blocks of `image_ids` as the actors finish them (any order), with the engine's
        events (skipped images with their reason, progress) emitted here on the driver."""
        if not image_ids:
            return
        import ray

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = self.ray_settings.progress
        if not self.ray_settings.progress:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        seen: set[int] = set()
        rows = self.dataset(image_ids).iter_rows()
        try:
            for row in _one_line_failures(rows):
                parsing = time.perf_counter()
                arrived = json.loads(row["entries"])
                self.seconds["driver"] += time.perf_counter() - parsing
                self.seconds["label"] += float(row["label_s"])
                self.seconds["actor call"] += float(row["call_s"])
                self.seconds["decoder pickle"] += float(row["pickle_s"])
                block = [entry for entry in arrived if entry["image"]["id"] not in seen]
                self.duplicates += len(arrived) - len(block)
                if not block:
                    continue
                self.workers[int(row["pid"])] += 1
                self.decoders[int(row["decoder"])] += 1
                fresh = {entry["image"]["id"] for entry in block}
                seen |= fresh
                for image_id, message in json.loads(row["skipped"]):
                    if image_id in fresh:
                        self.events.image_skipped(self.images.get(image_id), message,
                                                  self.source.skip_count(self.prompts, image_id))
                yield block
                self.events.batch_done(len(block), sum(self.source.count(self.prompts, entry["image"]["id"])
                                                       for entry in block if not entry.get("skipped")))
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()


def _one_line_failures(rows: Iterator[dict]) -> Iterator[dict]:
    """`rows`, with a failure inside Ray (an actor that cannot build its model, a worker that
    keeps dying) raised as one line naming the original error."""
    try:
        yield from rows
    except Exception as exc:
        if not type(exc).__module__.startswith("ray"):
            raise
        cause: BaseException = exc
        while True:  # Ray wraps the user's error (RayTaskError, UserCodeException, ...)
            inner = getattr(cause, "cause", None) or cause.__cause__
            if inner is None or inner is cause:
                break
            cause = inner
        text = str(cause).strip().splitlines()
        raise InputError(f"labeling on Ray failed: {type(cause).__name__}: {text[0] if text else ''}; the finished "
                         f"blocks are kept, rerun with --resume") from exc


def _decode_row(row: dict, *, prepare: Any, exif: str) -> list[dict]:
    """Decode and prepare the images of one batch (a Ray Data map task on a CPU worker)."""
    from ovsam_model.io.loader import load_image

    task = pickle.loads(row["task"])
    loaded = [load_image(record, prepare, exif) for record, _ in task]
    started = time.perf_counter()
    payload = pickle.dumps(loaded, protocol=pickle.HIGHEST_PROTOCOL)
    return [{"block": row["block"], "task": row["task"], "loaded": payload, "decoder": os.getpid(),
             "pickle_s": time.perf_counter() - started}]


class _Skips(LabelEvents):
    def __init__(self) -> None:
        self.skipped: list[tuple[int, str]] = []

    def image_skipped(self, image: Any, message: str, prompts: int) -> None:
        self.skipped.append((int(image.id), str(message)))


class PredictorActor:
    """One model per actor (Ray Data's class-based UDF): each call labels batches of decoded
    images with `engine.label_loaded`, the body of a plain run's loop."""

    def __init__(self, *, model: Any, vocabulary: Any, predictor_ref: Any, source: Any, label_source: str,
                 threads: int) -> None:
        import torch

        from . import api

        torch.set_num_threads(threads)
        if predictor_ref is not None:
            import ray

            self.predictor = ray.get(predictor_ref)
        else:
            self.predictor = api.load_predictor(model, vocabulary)
        self.source = source
        self.label_source = label_source
        self.pid = os.getpid()

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"block": [], "entries": [], "skipped": [], "pid": [], "decoder": [], "label_s": [],
                                "call_s": [], "pickle_s": []}
        for block, task, loaded, decoder, pickled in zip(batch["block"], batch["task"], batch["loaded"],
                                                         batch["decoder"], batch["pickle_s"]):
            called = time.perf_counter()
            images = pickle.loads(task)
            prompts = PromptSet(by_image={record.id: kept for record, kept in images if kept})
            events = _Skips()
            batch_of_loaded = pickle.loads(loaded)
            started = time.perf_counter()
            entries = label_loaded(self.predictor, self.source, prompts, batch_of_loaded,
                                   label_source=self.label_source, events=events)
            labeled = time.perf_counter()
            out["block"].append(int(block))
            out["entries"].append(json.dumps(entries, separators=(",", ":"), ensure_ascii=False))
            out["skipped"].append(json.dumps(events.skipped))
            out["pid"].append(self.pid)
            out["decoder"].append(int(decoder))
            out["label_s"].append(labeled - started)  # the engine's work
            out["call_s"].append(time.perf_counter() - called)  # and what Ray's rows cost here on top
            out["pickle_s"].append(float(pickled))  # and in the decoding task
        return out


def open_ray_labeler(ray: Union[bool, str, RaySettings], images: Any, source: Any, settings: "ModelSettings", *,
                     predictor: Any = None, ann: Any = None, label_source: str = "ovsam", batch_size: int = 2,
                     strict: bool = False, events: Optional[LabelEvents] = None) -> RayLabeler:
    """A `RayLabeler` (what `open_labeler(..., ray=...)` returns): connects to Ray, plans the
    actors from the cluster's resources, and builds the driver's copy of the model on the CPU
    (the vocabulary and the fingerprint come from it; the fingerprint names the actors' device)."""
    from . import api

    chosen = ray_settings(ray)
    assert chosen is not None
    check_settings(chosen)
    started = connect(chosen)
    try:
        import ray as ray_module

        strict_plan = started or chosen.address is None
        ray_plan = plan(chosen, ray_module.cluster_resources(), device=settings.device, strict=strict_plan)
        vocabulary, origin, warnings, options, predictor_ref = None, "the predictor's", [], {}, None
        if predictor is None:
            predictor, vocabulary, origin, warnings = api.build_for_run(settings, label_source, images, ann,
                                                                        load_as=replace(settings, device="cpu"))
            options = replace(settings, device=ray_plan.device).options()
        else:
            predictor_ref = ray_module.put(predictor)
        labeler = RayLabeler(predictor, images, source, ray_plan=ray_plan, ray_settings=chosen,
                             model=None if predictor_ref is not None else settings, vocabulary=vocabulary,
                             predictor_ref=predictor_ref, started=started, label_source=label_source,
                             batch_size=batch_size, workers=0, strict=strict, options=options, events=events)
    except BaseException:
        if started:
            import ray as ray_module

            ray_module.shutdown()
        raise
    labeler.vocabulary_origin = origin
    labeler.warnings = warnings
    return labeler
