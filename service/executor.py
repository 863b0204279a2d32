"""The chunk executor: the one place that turns a job's items into pixels (DESIGN §2).

Celery tasks and the embedded in-process runner both call `run_chunk`, so the two modes cannot
drift apart. Items are enumerated lazily from the spec, run through the pipeline in micro-batches,
and written as one shard; a bad item fails alone. Between micro-batches the executor asks whether
the job was paused or cancelled, and the chunk is committed only while its lease still holds.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from service import labels, metrics
from service.encode_pool import OrderedEncoder, default_workers, shared_pool
from service.encoding import to_uint8_batch
from service.errors import tenant_reason
from service.jobs import (
    Claim,
    Context,
    JobError,
    commit_chunk,
    job_prefix,
    job_row,
    read_sources,
    release_chunk,
    renew_lease,
    resolve_model,
)
from service.settings import Settings
from service.shards import ShardWriter
from service.specs import ImageRef, JobSpec, parse_spec
from service.storage import NotFound, Storage, parse_source_uri, storage_from_url

log = logging.getLogger(__name__)
StopCheck = Callable[[], bool]
Progress = Callable[[int, int], None]  # (items finished, images made) since the last call


@contextmanager
def _stage(name: str, rows: int | None = None) -> Iterator[None]:
    """Add the block's time to dpig_stage_seconds_total{stage}; with `rows`, it is a micro-batch
    of the model (batch size and duration histograms)."""
    started = time.perf_counter()
    yield
    seconds = time.perf_counter() - started
    metrics.STAGE_SECONDS.labels(name).inc(seconds)
    if rows is not None:
        metrics.BATCH_SIZE.observe(rows)
        metrics.BATCH_DURATION.observe(seconds)


class ItemError(Exception):
    """One item cannot be made; it is recorded in errors.jsonl and the job goes on."""


@dataclass
class ChunkOutcome:
    state: str  # "committed", "lost_lease", "stopped"
    done: int = 0
    failed: int = 0
    seconds: float = 0.0


class WrongWorker(RuntimeError):
    """This worker cannot make the job's bytes (another device class): the attempt fails with
    this reason, and the chunk goes to another worker."""


class PipelineCache:
    """Pipelines by model name and weights hash: a worker loads each model once."""

    def __init__(self, device: str = "cpu", batch_size: int = 32, **options: Any) -> None:
        self.device, self.batch_size, self.options = device, batch_size, options
        self._pipes: dict[tuple[str, str, int, str], Any] = {}
        self._lock = threading.Lock()
        self.load_seconds: dict[str, float] = {}

    def get(
        self,
        ctx: Context,
        name: str,
        weights_sha256: str,
        execution: dict[str, Any] | None = None,
    ) -> Any:
        """The pipeline of a model, with the job's micro-batch size and precision (`execution`,
        fixed at submit; this worker's own for jobs without one). A job fixed to another device
        class is refused: its bytes would differ."""
        execution = execution or {}
        device_class = str(self.device).split(":")[0]
        if execution.get("device") and execution["device"] != device_class:
            raise WrongWorker(
                f"the job runs on {execution['device']} workers; this one runs on {device_class}"
            )
        batch_size = int(execution.get("batch_size") or self.batch_size)
        options = self.options | (
            {"precision": execution["precision"]} if execution.get("precision") else {}
        )
        with self._lock:
            key = (name, weights_sha256, batch_size, str(options.get("precision", "fp32")))
            if key not in self._pipes:
                from dpig_core.pipeline import DPIGPipeline

                info = resolve_model(ctx, name)
                if info.weights_sha256 != weights_sha256:
                    raise JobError(409, f"model {name!r} changed since the job was submitted")
                started = time.perf_counter()
                self._pipes[key] = DPIGPipeline.from_pretrained(
                    info.path,
                    device=self.device,
                    batch_size=batch_size,
                    images_on_device=True,  # converted to uint8 there (to_uint8_batch)
                    **options,
                )
                self.load_seconds[name] = time.perf_counter() - started
                metrics.MODEL_LOAD.observe(self.load_seconds[name])
            return self._pipes[key]


# ------------------------------------------------------------------------------------------------
# inputs


_storages: dict[str, tuple[Settings, Storage]] = {}
_storages_lock = threading.Lock()


def source_storage(ctx: Context, url: str) -> Storage:
    """One storage client per bucket for the whole process (rebuilt only if the settings
    object changes): building a boto3 client costs ~100 ms, more than reading a small image."""
    with _storages_lock:
        found = _storages.get(url)
        if found is None or found[0] is not ctx.settings:
            found = _storages[url] = (ctx.settings, storage_from_url(url, ctx.settings))
        return found[1]


def read_uri(ctx: Context, uri: str, *, field: str = "uri") -> bytes:
    """The bytes of one source object (a local path, file:// or s3:// URI)."""
    allowed = ["file:///"] if ctx.embedded else ctx.settings.source_prefixes
    location = parse_source_uri(uri, allowed, field=field)
    limit = ctx.settings.max_source_bytes
    if location.storage_url.startswith("file://"):
        # the canonical file:// URI is percent-encoded (spaces, '#', '%', non-ASCII)
        path = Path(unquote(urlsplit(location.storage_url).path), location.prefix)
        handle: BinaryIO = path.open("rb")
    else:
        handle = source_storage(ctx, location.storage_url).open_read(location.prefix.rstrip("/"))
    with handle:
        data = handle.read(limit + 1)  # never more than the cap, whatever the object's size
    if len(data) > limit:
        raise SourceTooLarge(f"larger than {limit} bytes (max_source_bytes)")
    return data


class SourceTooLarge(ValueError):
    """A source object over `max_source_bytes`: its items fail with this reason."""


# reading a source fails its items only for reasons intrinsic to the item: it does not exist,
# is not a file, is not readable by us, is too large, or its URI is not allowed
ITEM_READ_ERRORS = (
    NotFound,
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def _decode_person(
    data: bytes, keypoints: Any, label: str, pipe: Any, settings: Settings
) -> tuple[Any, Any]:
    """Image bytes + keypoints in its pixels (or None: estimated) → model-frame tensors.
    Only `source_formats` up to `max_source_pixels` are decoded (the header is read first)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format not in settings.source_formats:
                raise ItemError(
                    f"{label}: image format {opened.format} is not accepted "
                    f"(accepted: {', '.join(settings.source_formats)})"
                )
            if opened.width * opened.height > settings.max_source_pixels:
                raise ItemError(
                    f"{label}: {opened.width}x{opened.height} image exceeds "
                    f"{settings.max_source_pixels} pixels (max_source_pixels)"
                )
            image = opened.convert("RGB")
    except (ItemError, SoftTimeLimitExceeded):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder error is this item's failure
        raise ItemError(f"{label}: unreadable image ({exc})") from None
    if keypoints is None:
        keypoints = _estimate(np.asarray(image), label)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    try:
        loaded: tuple[Any, Any] = pipe.load_people(
            [(io.BytesIO(buf.getvalue()), np.asarray(keypoints, np.float32))]
        )
        return loaded
    except (ValueError, OSError) as exc:
        raise ItemError(f"{label}: {exc}") from None


def _estimate(pixels: Any, label: str) -> Any:
    try:
        from dpig_core.data.pose_estimation import PoseEstimatorUnavailable, estimate_pose
    except ImportError:  # pragma: no cover - the module itself imports lazily
        raise ItemError(f"{label}: no keypoints given") from None
    try:
        rcv = estimate_pose(pixels)
    except PoseEstimatorUnavailable:
        raise ItemError(
            f"{label}: no keypoints given and no pose estimator installed (pip install "
            "'dpig[pose]', or pass keypoints)"
        ) from None
    if rcv is None:
        raise ItemError(f"{label}: no person found")
    return rcv


# sources are read LOAD_PARALLEL at a time, in groups of LOAD_GROUP between heartbeats (stop
# check and lease renewal), so loading a large pose-grid chunk never outlasts its lease
LOAD_GROUP = 64
LOAD_PARALLEL = 8


class _People:
    """Encoded people by URI, loaded once per chunk; `beat` is called between groups of reads."""

    def __init__(self, ctx: Context, pipe: Any, beat: Callable[[], None] = lambda: None) -> None:
        self.ctx, self.pipe, self.beat = ctx, pipe, beat
        self._cache: dict[tuple[str, Any], Any] = {}

    @staticmethod
    def _key(ref: ImageRef) -> tuple[str, Any]:
        return ref.uri, None if ref.keypoints is None else str(ref.keypoints)

    def _read(self, ref: ImageRef) -> bytes | ItemError:
        try:
            return read_uri(self.ctx, ref.uri)
        except ITEM_READ_ERRORS as exc:
            log.warning("reading %s failed", ref.uri, exc_info=True)  # details for the operator
            return ItemError(f"{ref.uri}: {tenant_reason(exc)}")
        # anything else (S3 or the network down, a timeout, Celery's soft time limit) is not the
        # item's fault: it fails the attempt, and the chunk is retried after a backoff

    def get_many(self, refs: Sequence[ImageRef]) -> list[Any]:
        """Factors (one person) or the ItemError of each ref. New people are encoded together,
        in as few micro-batches as possible."""
        import torch

        new = list({self._key(r): r for r in refs if self._key(r) not in self._cache}.items())
        loaded: dict[tuple[str, Any], tuple[Any, Any]] = {}
        with ThreadPoolExecutor(min(LOAD_PARALLEL, max(1, len(new)))) as pool:
            for start in range(0, len(new), LOAD_GROUP):
                group = new[start : start + LOAD_GROUP]
                with _stage("load"):
                    read = list(pool.map(self._read, [ref for _, ref in group]))
                    for (key, ref), data in zip(group, read, strict=True):
                        try:
                            if isinstance(data, ItemError):
                                raise data
                            settings = self.ctx.settings
                            loaded[key] = _decode_person(
                                data, ref.keypoints, ref.uri, self.pipe, settings
                            )
                        except ItemError as exc:
                            self._cache[key] = exc
                self.beat()
        if loaded:
            keys = list(loaded)
            images = torch.cat([loaded[k][0] for k in keys])
            rcv = torch.cat([loaded[k][1] for k in keys])
            with _stage("encode", len(keys)):
                factors = self.pipe.encode(images, rcv)
            for row, key in enumerate(keys):
                self._cache[key] = factors.select([row])
        return [self._cache[self._key(r)] for r in refs]

    def get(self, ref: ImageRef) -> Any:
        found = self.get_many([ref])[0]
        if isinstance(found, ItemError):
            raise found
        return found


def _batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# ------------------------------------------------------------------------------------------------
# per kind: yield (item, uint8 [H, W, 3] image | ItemError, meta) in item order


def _sample(
    ctx: Context, spec: Any, pipe: Any, items: list[int], beat: Callable[[], None]
) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    people = _People(ctx, pipe, beat)
    fixed = {}
    for factor in ("fg", "bg", "pose"):
        choice = getattr(spec, factor)
        if choice != "sample" and factor in pipe.factors:
            try:
                fixed[factor] = people.get(choice)
            except ItemError as exc:  # a bad reference fails every item
                for item in items:
                    yield item, exc, {"seed": spec.seed}
                return
    fixed_from = {factor: getattr(spec, factor).uri for factor in fixed}
    sampled = [factor for factor in pipe.factors if factor not in fixed]
    for batch in _batches(items, pipe.batch_size):
        with _stage("infer", len(batch)):
            factors = pipe.sample_factors(
                batch, spec.seed, per_identity=spec.per_identity, fixed=fixed
            )
            images = to_uint8_batch(pipe.render(factors))
        poses = factors.rcv.tolist()  # once per micro-batch, not per item
        for item, image, rcv in zip(batch, images, poses, strict=True):
            meta: dict[str, Any] = {"item": item, "seed": spec.seed}
            if spec.per_identity:
                meta["identity"] = item // spec.per_identity
            meta |= labels.sample(spec, item, rcv, sampled, fixed_from)
            yield item, image, meta


def _pose_grid(
    ctx: Context, spec: Any, pipe: Any, items: list[int], job_id: str, beat: Callable[[], None]
) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    import torch

    from dpig_core.data.pose_files import rescale_rcv

    cfg = pipe.config
    sources = read_sources(ctx, job_id)
    n_poses = len(spec.poses)
    poses = torch.stack(
        [
            torch.from_numpy(
                rescale_rcv(
                    np.asarray(p.keypoints, np.float32),
                    (p.height, p.width),
                    (cfg.height, cfg.width),
                )
            )
            for p in spec.poses
        ]
    )
    base = spec.images.rstrip("/") + "/"
    wanted = sorted({i // n_poses for i in items})
    refs = [
        ImageRef(uri=base + sources[s], keypoints=(spec.source_keypoints or {}).get(sources[s]))
        for s in wanted
    ]
    encoded, errors = {}, {}
    for s, found in zip(wanted, _People(ctx, pipe, beat).get_many(refs), strict=True):
        if isinstance(found, ItemError):
            errors[s] = found
        else:
            encoded[s] = found
    if encoded:
        from dpig_core.pipeline import Factors

        order = sorted(encoded)
        row_of = {s: r for r, s in enumerate(order)}
        stacked = Factors(
            torch.cat([encoded[s].fg for s in order]),
            None if encoded[order[0]].bg is None else torch.cat([encoded[s].bg for s in order]),
            torch.cat([encoded[s].rcv for s in order]),
        )
    for batch in _batches(items, pipe.batch_size):
        good = [i for i in batch if i // n_poses in encoded]
        images = (
            _transfer(pipe, stacked, poses, [(row_of[i // n_poses], i % n_poses) for i in good])
            if good
            else []
        )
        by_item = dict(zip(good, images, strict=True))
        for item in batch:
            s, p = divmod(item, n_poses)
            meta = {
                "item": item,
                "source": sources[s],
                "pose": spec.poses[p].id or str(p),
                "seed": spec.seed,
            }
            given = (spec.source_keypoints or {}).get(sources[s])
            custom_id = (spec.source_custom_ids or {}).get(sources[s])
            meta |= labels.pose_grid(given, poses[p], custom_id)
            yield item, by_item.get(item, errors.get(s)), meta


def _transfer(pipe: Any, sources: Any, poses: Any, pairs: list[tuple[int, int]]) -> Any:
    with _stage("infer", len(pairs)):
        return to_uint8_batch(pipe.transfer(sources, poses, pairs=pairs))


def _swap(
    ctx: Context, spec: Any, pipe: Any, items: list[int], beat: Callable[[], None]
) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    people = _People(ctx, pipe, beat)
    for item in items:
        row = spec.items[item]
        meta = {"item": item, "source": row.fg.uri, "pose": row.pose.uri, "seed": spec.seed}
        try:
            fg, pose = people.get(row.fg), people.get(row.pose)
            bg = people.get(row.bg) if row.bg is not None else None
        except ItemError as exc:
            yield item, exc, meta | labels.swap(row, None)
            continue
        meta |= labels.swap(row, pose.rcv[0])
        with _stage("infer", 1):
            image = to_uint8_batch(pipe.swap(fg, bg, pose))[0]
        yield item, image, meta


def _interpolate(
    ctx: Context, spec: Any, pipe: Any, items: list[int], beat: Callable[[], None]
) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    people = _People(ctx, pipe, beat)
    paths: dict[int, Any] = {}
    for item in items:
        pair, step = divmod(item, spec.steps)
        meta = {
            "item": item,
            "source": spec.pairs[pair].a.uri,
            "pose": str(step),
            "seed": spec.seed,
        } | labels.interpolate(spec, pair, step)
        if pair not in paths:
            try:
                a, b = people.get(spec.pairs[pair].a), people.get(spec.pairs[pair].b)
                with _stage("infer", spec.steps):
                    paths[pair] = to_uint8_batch(
                        pipe.interpolate(
                            a,
                            b,
                            spec.steps,
                            method=spec.method,
                            factors=[f for f in spec.factors if f in pipe.factors],
                        )
                    )
            except ItemError as exc:
                paths[pair] = exc
        result = paths[pair]
        yield item, result if isinstance(result, ItemError) else result[step], meta


def _items(
    ctx: Context, spec: JobSpec, pipe: Any, items: list[int], job_id: str, beat: Callable[[], None]
) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    if spec.kind == "sample":
        return _sample(ctx, spec, pipe, items, beat)
    if spec.kind == "pose_grid":
        return _pose_grid(ctx, spec, pipe, items, job_id, beat)
    if spec.kind == "swap":
        return _swap(ctx, spec, pipe, items, beat)
    return _interpolate(ctx, spec, pipe, items, beat)


def _market_name(item: int, meta: dict[str, Any], extension: str) -> str:
    identity = meta.get("identity", 0)
    return f"{identity:04d}_c1s1_{item:06d}_00.{extension}"


# ------------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    """The chunk must stop now: "stopped" (pause, cancel, shutdown) or "lost_lease"."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


@dataclass
class _Heartbeat:
    """Called between micro-batches and between groups of source reads: raises _Interrupted
    when the chunk should stop or has lost its lease, and renews the lease once a third of it
    has passed, so a long chunk (or a long load) is not taken for a lost one.

    `should_stop` (a database query) runs at most every `stop_check_seconds`, or when `force`d:
    a pause or cancel is seen within that time plus one micro-batch."""

    ctx: Context
    claim: Claim
    should_stop: StopCheck
    renewed: float = field(default_factory=time.monotonic)
    checked: float = field(default_factory=time.monotonic)

    def __call__(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.checked >= self.ctx.settings.stop_check_seconds:
            self.checked = now
            if self.should_stop():
                raise _Interrupted("stopped")
        if now - self.renewed > self.ctx.settings.lease_seconds / 3:
            if not renew_lease(self.ctx, self.claim):
                raise _Interrupted("lost_lease")  # someone else owns the chunk now
            self.renewed = time.monotonic()


def execute_chunk(
    ctx: Context,
    claim: Claim,
    pipes: PipelineCache,
    *,
    should_stop: StopCheck = lambda: False,
    progress: Progress = lambda _finished, _made: None,
) -> ChunkOutcome:
    """Make a leased chunk's items, write its shard, and commit it. Errors that are not one
    item's fault propagate (the caller releases the lease as a failed attempt).

    Between micro-batches and between groups of source reads: stop (lease handed back, no
    commit) when `should_stop()` says so (asked at most every `stop_check_seconds`), and renew
    the lease once a third of it has passed, so a long chunk is not taken for a lost one. The
    encode pool compresses micro-batch k while the model runs k+1; waiting on it runs the same
    checks (`OrderedEncoder.ready`), and they run once more after the last image.
    """
    started = time.perf_counter()
    job = job_row(ctx, claim.job_id)
    spec = parse_spec(job.spec)
    with _stage("load"):
        pipe = pipes.get(ctx, job.model_name, job.weights_sha256, job.execution)
    fmt = spec.output
    writer = ShardWriter(
        ctx.storage,
        job_prefix(job.id),
        claim.index,
        spec.layout,
        claim.tag,
        extension=fmt.extension,
        content_type=fmt.content_type,
    )
    workers = ctx.settings.encode_workers
    encoder = OrderedEncoder(
        shared_pool(workers),
        fmt,
        max_pending=2 * pipe.batch_size,
        prepare=writer.entry,  # the tar members and manifest row, in the pool too
        # about four tasks per pool thread and micro-batch: few wake-ups, an even spread
        group=pipe.batch_size // (4 * (workers or default_workers())),
    )
    beat = _Heartbeat(ctx, claim, should_stop)

    def outcome(state: str) -> ChunkOutcome:
        seconds = time.perf_counter() - started
        metrics.CHUNK_ATTEMPTS.labels(state).inc()
        return ChunkOutcome(state, writer.done, writer.failed, seconds)

    try:
        _make_items(ctx, claim, spec, pipe, writer, encoder, beat, progress)
    except _Interrupted as stop:
        encoder.cancel()
        writer.close()
        if stop.state == "stopped":
            release_chunk(ctx, claim)
        return outcome(stop.state)
    except BaseException:
        encoder.cancel()
        writer.close()
        raise
    with _stage("upload"):
        writer.write(
            {"device": str(pipe.device), "precision": pipe.precision, "batch_size": pipe.batch_size}
        )
    if not commit_chunk(ctx, claim, writer.done, writer.failed):
        return outcome("lost_lease")
    metrics.IMAGES_GENERATED.inc(writer.done)
    metrics.CHUNK_DURATION.observe(time.perf_counter() - started)
    return outcome("committed")


def _make_items(
    ctx: Context,
    claim: Claim,
    spec: JobSpec,
    pipe: Any,
    writer: ShardWriter,
    encoder: OrderedEncoder,
    beat: _Heartbeat,
    progress: Progress,
) -> None:
    """Every item of the chunk into `writer`, in item order, through the encode pool; `beat()`
    (which raises _Interrupted) runs between micro-batches and while waiting on the pool."""
    fmt = spec.output
    market_names = spec.layout == "files" and spec.kind == "sample" and bool(spec.per_identity)
    poll_seconds = min(1.0, ctx.settings.lease_seconds / 12)

    def checkpoint() -> bool:
        beat()
        return False

    def write_ready(drain: bool) -> None:
        with _stage("upload"):  # waiting on the encode pool, and shard assembly
            for done in encoder.ready(
                drain=drain, checkpoint=checkpoint, poll_seconds=poll_seconds
            ):
                if done.error is not None:
                    writer.fail(done.item, done.error, done.meta)
                    metrics.ITEMS_FAILED.labels(metrics.failure_reason(done.error)).inc()
                else:
                    writer.add_entry(done.prepared)  # made in the pool (writer.entry)
                progress(1, 0 if done.error is not None else 1)
            writer.flush()

    items = list(range(claim.item_start, claim.item_stop))
    since_check = 0
    for item, image, meta in _items(ctx, spec, pipe, items, claim.job_id, beat):
        if isinstance(image, ItemError):
            encoder.put_error(item, str(image), meta)
        else:
            name = _market_name(item, meta, fmt.extension) if market_names else None
            encoder.put(item, image, meta, name)
        since_check += 1
        if since_check >= pipe.batch_size:
            since_check = 0
            write_ready(drain=False)
            beat()
    write_ready(drain=True)
    beat(force=True)
