"""Scale-out on Ray Serve: replicas of the engine (one GPU each) behind the same HTTP API.

Two deployments:

- ``ZImageReplica`` builds an engine in its constructor (the same ``build_engine`` as
  ``zimage serve``: the pipeline with its speed options, or the fake engine), warms it up before
  it takes traffic, and answers ``generate`` as a stream (one progress item per step, then the
  images as PNG bytes with their metadata, which the ingress stores as they are, without decoding
  and encoding them again), ``encode``, ``tokenize``, ``rewrite``, ``info``.
  ``max_ongoing_requests=1``: a replica runs one generation at a time; ``max_queued_requests``
  caps what may wait for it; autoscaling settings come from the options; ``check_health`` fails
  once the engine is broken, and Serve replaces the replica.
- ``ZImageIngress`` mounts the FastAPI app of ``zimage serve`` (job API, OpenAI route, web page)
  and keeps the history. Its job manager runs one worker per replica (``settings.workers``); each
  worker forwards a job to a replica through ``RayEngine``. The ingress queue answers 429 with
  ``Retry-After`` when full; a job whose replica dies mid-run is retried on another replica, so an
  accepted request is not lost.

Use ``zimage serve --ray`` on one machine, or ``serve run`` / ``serve deploy`` with
``docs/deploy/serve_config.yaml`` on a cluster (docs/scaling.md).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
from dataclasses import fields
from typing import Any

from ray import serve

from ..metadata import png_info, save_png
from .engine import Engine, GeneratedImage, GenerationRequest
from .jobs import JobCancelled
from .remote import RemoteCallAborted, abort_check

logger = logging.getLogger(__name__)

RETRIES = 3  # attempts of one job when a replica dies under it


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return f"pid-{os.getpid()}"


IMAGE_FIELDS = {"image": "RGB", "mask_image": "L", "control_image": "RGB"}  # the request's PIL inputs, sent as PNG


def _request_payload(request: GenerationRequest) -> dict[str, Any]:
    payload = {f.name: getattr(request, f.name) for f in fields(request) if f.name not in IMAGE_FIELDS}
    for name in IMAGE_FIELDS:
        image = getattr(request, name)
        if image is not None:
            buffer = io.BytesIO()
            save_png(image, buffer)
            payload[f"{name}_png"] = buffer.getvalue()
    return payload


def _request_from_payload(payload: dict[str, Any]) -> GenerationRequest:
    payload = dict(payload)
    for name, mode in IMAGE_FIELDS.items():
        png = payload.pop(f"{name}_png", None)
        if png is not None:
            from PIL import Image

            payload[name] = Image.open(io.BytesIO(png)).convert(mode)
    return GenerationRequest(**payload)


class ZImageReplica:
    """One engine (one GPU). Deployed by :func:`build_app`; usable directly in tests."""

    def __init__(self, options: dict[str, Any]):
        from ..cli.serve import build_engine

        self.options = dict(options)
        self.engine: Engine = build_engine(self.options)
        self.broken: str | None = None
        if self.options.get("warmup", True):
            self.engine.warmup()  # compile / capture before taking traffic
        logger.info("replica %s ready (%s)", _replica_id(), self.engine.model_name)

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"model_name": e.model_name, "variant": e.variant, "default_steps": e.default_steps,
                "default_guidance": e.default_guidance, "scheduler_shift": e.scheduler_shift,
                "dynamic_shift": e.dynamic_shift, "text_encoder": e.text_encoder_info(),
                "describe": e.describe(), "can_generate": e.can_generate, "can_rewrite": e.can_rewrite,
                "can_inpaint": e.can_inpaint, "can_control": e.can_control, "cache_problem": e.cache_problem,
                "replica": _replica_id()}

    def generate(self, payload: dict[str, Any]):
        """Stream {"type": "progress", step, total} items, then {"type": "images", images: [...]}."""
        request = _request_from_payload(payload)
        items: queue.Queue = queue.Queue()
        stop = threading.Event()

        def callback(step: int, total: int) -> None:
            if stop.is_set():
                raise JobCancelled()
            items.put({"type": "progress", "step": step, "total": total})

        def run() -> None:
            try:
                results = self.engine.generate(request, callback)
                images = []
                for result in results:
                    record = {**result.record, "replica": _replica_id()}
                    buffer = io.BytesIO()
                    save_png(result.image, buffer, png_info(record))  # the bytes the ingress stores as they are
                    images.append({"png": buffer.getvalue(), "seed": result.seed, "record": record})
                items.put({"type": "images", "images": images})
            except BaseException as e:  # noqa: BLE001 - handed to the stream
                items.put({"type": "error", "error": e})

        worker = threading.Thread(target=run, name="zimage-replica-job", daemon=True)
        worker.start()
        try:
            while True:
                item = items.get()
                if item["type"] == "error":
                    raise item["error"]
                yield item
                if item["type"] == "images":
                    return
        finally:
            stop.set()  # the caller went away (cancel): stop at the next step boundary
            worker.join()

    def encode(self, texts: list[str], max_sequence_length: int | None = None):
        return [t.cpu() for t in self.engine.encode(texts, max_sequence_length)]

    def tokenize(self, texts: list[str], max_sequence_length: int | None = None):
        return self.engine.tokenize(texts, max_sequence_length)

    def token_counts(self, texts: list[str]):
        return self.engine.token_counts(texts)

    def rewrite(self, prompt: str, kwargs: dict[str, Any]) -> str:
        return self.engine.rewrite(prompt, **kwargs)

    def whoami(self) -> str:
        return _replica_id()

    def break_for_test(self, reason: str = "marked broken") -> str:
        """Make the next health check fail (the integration test's way to kill a replica)."""
        self.broken = reason
        return _replica_id()

    def check_health(self) -> None:
        if self.broken:
            raise RuntimeError(f"replica {_replica_id()} is unhealthy: {self.broken}")


class RayEngine(Engine):
    """The ingress's engine: every model call goes to a replica through a deployment handle."""

    def __init__(self, handle, info: dict[str, Any], templates_dirs: list[str] | None = None):
        super().__init__(info["model_name"], info["variant"], templates_dirs)
        self.handle = handle
        self._info = info
        self.can_generate = info["can_generate"]
        self.can_rewrite = info["can_rewrite"]
        self.can_inpaint = info.get("can_inpaint", False)
        self.can_control = info.get("can_control", False)
        self.cache_problem = info.get("cache_problem")

    default_steps = property(lambda self: self._info["default_steps"])
    default_guidance = property(lambda self: self._info["default_guidance"])
    scheduler_shift = property(lambda self: self._info["scheduler_shift"])
    dynamic_shift = property(lambda self: self._info["dynamic_shift"])

    def text_encoder_info(self) -> dict[str, Any]:
        return self._info["text_encoder"]

    def describe(self) -> dict[str, Any]:
        return {**self._info["describe"], "scale_out": "ray serve"}

    def generate(self, request: GenerationRequest, callback) -> list[GeneratedImage]:
        payload = _request_payload(request)
        check = abort_check()  # the job's cancel or time limit (the job manager generates inside abort_when)
        for attempt in range(1, RETRIES + 1):
            stream = self.handle.options(stream=True).generate.remote(payload)
            done, aborted = threading.Event(), threading.Event()
            if check is not None:  # also while no step comes: the job waits for a replica (all busy, one starting)
                threading.Thread(target=_cancel_on, args=(check, stream, done, aborted), daemon=True,
                                 name="zimage-ray-abort").start()
            try:
                for item in stream:
                    if item["type"] == "progress":
                        callback(item["step"], item["total"])  # raises to cancel or time out
                    else:  # the PNG is stored as it came (its metadata is png_info(record)); the writer
                        # decodes it (for the thumbnail), refusing a damaged one
                        return [GeneratedImage.from_png(x["png"], x["seed"], x["record"]) for x in item["images"]]
                raise RuntimeError("the replica ended the stream without images")
            except BaseException as e:
                stream.cancel()
                if aborted.is_set():
                    raise RemoteCallAborted("the job was cancelled or ran out of time on its replica") from None
                if attempt < RETRIES and _replica_died(e):
                    logger.warning("a replica died during a job (attempt %d): %s; retrying on another", attempt, e)
                    continue
                raise _engine_error(e)  # (Ray's wrapper stays its __context__)
            finally:
                done.set()
        raise AssertionError("unreachable")

    def _call(self, method: str, *args):
        try:
            return getattr(self.handle, method).remote(*args).result()
        except Exception as e:
            raise _engine_error(e)

    def encode(self, texts, max_sequence_length=None):
        return self._call("encode", list(texts), max_sequence_length)

    def tokenize(self, texts, max_sequence_length=None):
        return self._call("tokenize", list(texts), max_sequence_length)

    def token_counts(self, texts):
        return self._call("token_counts", list(texts))

    def rewrite(self, prompt: str, **kwargs) -> str:
        return self._call("rewrite", prompt, kwargs)


def _cancel_on(check, stream, done: threading.Event, aborted: threading.Event) -> None:
    """Cancel ``stream`` once ``check()`` is true (asked a few times a second until ``done``): the
    wait for its next item ends then, though no step has come to raise from the callback."""
    while not done.wait(0.2):
        if check():
            aborted.set()
            stream.cancel()
            return


def _engine_error(error: BaseException) -> BaseException:
    """The engine's own exception for one that a replica raised: Ray wraps it in a RayTaskError whose
    text starts with the replica's process title, pid, address and actor in terminal colours (what a
    failed job's ``error`` and a 422 showed), not the engine's message."""
    import ray.exceptions as rex

    cause = getattr(error, "cause", None)
    return cause if isinstance(error, rex.RayTaskError) and isinstance(cause, BaseException) else error


def _replica_died(error: BaseException) -> bool:
    import ray.exceptions as rex

    kinds = tuple(getattr(rex, name) for name in ("RayActorError", "ActorDiedError", "ActorUnavailableError")
                  if hasattr(rex, name))
    return isinstance(error, kinds) or isinstance(getattr(error, "cause", None), kinds)


class ZImageIngress:
    """The HTTP entry point: the app of ``zimage serve`` over a :class:`RayEngine`, history here."""

    def __init__(self, replica, options: dict[str, Any], workers: int):
        self.replica = replica
        self.options = dict(options)
        self.workers = workers

    async def __serve_build_asgi_app__(self):
        from ..cli.serve import build_settings
        from .app import create_app

        info = await self.replica.info.remote()  # this runs in the replica's event loop: await, no .result()
        settings = build_settings(self.options)
        settings.workers = self.workers
        engine = RayEngine(self.replica, info, list(self.options.get("templates_dir") or []))
        return create_app(engine, settings)


def scaling_options(options: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Serve options of the replica deployment, and the number of ingress workers (max replicas)."""
    replicas = 1 if options.get("replicas") is None else options["replicas"]  # (0 is refused, not taken as 1)
    low, high = options.get("min_replicas"), options.get("max_replicas")
    deployment: dict[str, Any] = {
        "max_ongoing_requests": 1,
        "max_queued_requests": options.get("max_queued_requests", 4),
        "ray_actor_options": {"num_gpus": options.get("gpus_per_replica", 1), "num_cpus": 1},
        "health_check_period_s": options.get("health_check_period_s", 10.0),
        "health_check_timeout_s": options.get("health_check_timeout_s", 30.0),
    }
    if low is not None or high is not None:
        low, high = low if low is not None else 1, high if high is not None else max(low or 1, replicas)
        if not 1 <= low <= high:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {low} and {high}")
        deployment["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                            "target_ongoing_requests": options.get("target_ongoing_requests", 1)}
        return deployment, high
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    deployment["num_replicas"] = replicas
    return deployment, replicas


def build_app(options: dict[str, Any]):
    """The Ray Serve application: an ingress in front of the replicas. ``options`` are the
    ``zimage serve`` options (model, device, speed flags, queue size, token, data dir, ...) plus
    ``replicas`` or ``min_replicas``/``max_replicas``/``target_ongoing_requests``,
    ``gpus_per_replica``, ``max_queued_requests`` and the health-check periods."""
    replica_options, workers = scaling_options(options)
    replica = serve.deployment(ZImageReplica, name="ZImageReplica").options(**replica_options)
    ingress = serve.deployment(serve.ingress()(ZImageIngress), name="ZImageIngress",
                               num_replicas=1, max_ongoing_requests=10_000)
    return ingress.bind(replica.bind(options), options, workers)


def app_builder(args: dict[str, Any]):
    """Entry point for ``serve run zimage_native.server.ray_serve:app_builder`` and serve_config.yaml:
    ``args`` are the options of :func:`build_app` (missing ones take the ``zimage serve`` defaults)."""
    from ..cli.serve import default_options

    return build_app({**default_options(), **(args or {})})
