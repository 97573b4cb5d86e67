"""``zimage serve``: the generation server (job API, OpenAI-compatible route, web page, history).

Needs the optional extra: ``pip install "zimage-native[server]"``. The model is loaded (and
warmed up when torch.compile or CUDA graphs are on) before the server starts listening. See
docs/server.md.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import click

from ..hub import DEFAULT_MODEL
from .options import UserPath, config_file, loading, placement, speed, vae_tiling
from ._common import check_writable_folder, user_errors
from .config import (apply_layers, config_origins, config_source, convert, naming_config_origins, option_keys,
                     read_profile)
from .rewrite import chat_rewriter, llm_options

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--model", "--model-path", "model", default=None,
              help=f"Model folder (diffusers layout) or Hub id [default: {DEFAULT_MODEL}].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; use a token when exposing it).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--token", default=None, envvar="ZIMAGE_TOKEN",
              help="Bearer token required on every route but /health and the page shell [env ZIMAGE_TOKEN].")
@click.option("--queue-size", type=int, default=8, show_default=True,
              help="Jobs that may wait behind the running one; beyond that: 429 with Retry-After.")
@click.option("--data-dir", type=UserPath(file_okay=False, path_type=Path), default=None,
              help="History folder (images + SQLite), one server at a time [default: "
                   "$XDG_DATA_HOME/zimage-native/server; with --fake: .../server-fake; with --encoder-only: "
                   ".../server-encoder].")
@loading
@click.option("--encoder-timeout", type=float, default=120.0, show_default=True,
              help="With --encoder-url: seconds to wait for the encoder's answer (a cancel or --job-timeout "
                   "stops the wait sooner; connecting gives up after 10 s).")
@click.option("--encoder-only", is_flag=True,
              help="Load only the text encoder and tokenizer: serve /api/encode (and rewrite) "
                   "for --encoder-url clients.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Scale out on Ray Serve: replicas of the engine (one GPU each) behind this API (docs/scaling.md).")
@click.option("--ray-address", default=None, help="Ray cluster to join [default: start a local one].")
@click.option("--replicas", type=int, default=None, help="Fixed number of replicas [default: the visible GPUs, at least 1].")
@click.option("--min-replicas", type=int, default=None, help="Autoscaling: fewest replicas.")
@click.option("--max-replicas", type=int, default=None, help="Autoscaling: most replicas.")
@click.option("--target-ongoing-requests", type=float, default=1.0, show_default=True,
              help="Autoscaling: requests per replica to aim for.")
@click.option("--gpus-per-replica", type=float, default=1.0, show_default=True, help="GPUs each replica reserves.")
@click.option("--max-queued-requests", type=int, default=4, show_default=True,
              help="Requests that may wait at a replica (the ingress queue answers 429 before that).")
@llm_options
@click.option("--fake", is_flag=True, help="No model: a fake engine that makes solid-colour images (demos, tests).")
@click.option("--fake-step-delay", type=float, default=0.05, show_default=True,
              help="Seconds per step of the fake engine.")
@click.option("--warmup/--no-warmup", default=None,
              help="Run one generation before listening [default: on with --compile or --cuda-graphs].")
@click.option("--max-side", type=int, default=2048, show_default=True,
              help="Largest width or height in pixels a request may ask.")
@click.option("--min-side", type=int, default=256, show_default=True,
              help="Smallest width or height in pixels a request may ask.")
@click.option("--max-pixels", type=int, default=2048 * 2048, show_default=True,
              help="Largest width x height in pixels a request may ask.")
@click.option("--max-steps", type=int, default=100, show_default=True, help="Most steps a request may ask.")
@click.option("--max-images", type=int, default=4, show_default=True, help="Most images (n) per request.")
@click.option("--max-history", type=int, default=None, help="Keep only the newest N images [default: all].")
@click.option("--job-timeout", type=float, default=None, help="Seconds a job may run before it fails [default: none].")
@click.option("--full-sync/--no-full-sync", default=False, show_default=True,
              help="SQLite synchronous=FULL: history survives a power loss, at some cost per write.")
@click.option("--templates-dir", type=UserPath(exists=True, file_okay=False), multiple=True,
              help="Extra template folder (repeatable).")
@placement
@speed
@vae_tiling
@config_file
@click.pass_context
@user_errors
def serve(ctx, config_path, profile, **opts):
    """Serve Z-Image over HTTP: job API with live progress, OpenAI-compatible images route, web page."""
    config_path = config_source(config_path, profile)
    config = {}
    if config_path:
        from .generate import generate

        values = read_profile(config_path, profile)
        generation_only = set(option_keys(generate)) - set(option_keys(ctx.command))
        skipped = sorted(k for k in values if k in generation_only)
        if skipped:
            logger.info("zimage serve ignores the generation keys %s of %s", skipped, config_path)
        values = {k: v for k, v in values.items() if k not in generation_only}
        config = convert(ctx, values)
    opts = apply_layers(ctx, opts, config)
    with naming_config_origins(ctx, config_origins(ctx, values) if config_path else {}):
        run_server(opts)


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` for a moment, as uvicorn will (with SO_REUSEADDR), so that a port in use fails
    before the model loads; raises ValueError naming --port."""
    import socket

    if port == 0:  # the system picks a free one
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address this machine can listen on ({e.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); another server may "
                             f"be using it: pick another port with --port") from None


def build_settings(o: dict):
    from ..server.settings import Limits, ServerSettings, default_data_dir

    if o["queue_size"] < 0:
        raise ValueError(f"--queue-size must be >= 0, got {o['queue_size']}")
    if not 0 <= o["port"] <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {o['port']}")
    if o["min_side"] < 16 or o["min_side"] > o["max_side"]:
        raise ValueError(f"need 16 <= --min-side <= --max-side, got {o['min_side']} and {o['max_side']}")
    if o.get("encoder_timeout") is not None and not o["encoder_timeout"] > 0:
        raise ValueError(f"--encoder-timeout must be > 0 seconds, got {o['encoder_timeout']}")
    for key in ("max_steps", "max_images", "max_pixels"):
        if o[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {o[key]}")
    limits = Limits(min_side=o["min_side"], max_side=o["max_side"], max_pixels=o["max_pixels"],
                    max_steps=o["max_steps"], max_images=o["max_images"])
    # Fake images stay out of a real history; an encoder server may run beside the server it feeds.
    data_dir = o["data_dir"] or default_data_dir(fake=bool(o.get("fake")), encoder_only=bool(o.get("encoder_only")))
    return ServerSettings(data_dir=data_dir, queue_size=o["queue_size"], token=o["token"],
                          limits=limits, max_history=o["max_history"], job_timeout=o["job_timeout"],
                          full_sync=o["full_sync"])


def build_engine(o: dict):
    """The engine the server drives: fake, text encoder only, or the full pipeline (loaded here)."""
    from ..server.engine import EncoderOnlyEngine, FakeEngine, PipelineEngine

    templates = list(o["templates_dir"])
    if o["fake"]:
        return FakeEngine(o["fake_step_delay"], model_name=o["model"] or "fake", variant=o["variant"] or "turbo",
                          templates_dirs=templates)
    if o.get("controlnet_config") is not None and o.get("controlnet") is None:
        raise ValueError("--controlnet-config needs --controlnet")
    if o["encoder_only"]:
        if o.get("controlnet") is not None:
            raise ValueError("--encoder-only and --controlnet exclude each other (the ControlNet runs with the DiT)")
        if o["encoder_url"]:
            raise ValueError("--encoder-only and --encoder-url exclude each other")
        device = o["text_encoder_device"] or o["device"]
        return EncoderOnlyEngine.from_pretrained(o["model"] or DEFAULT_MODEL, device=device, dtype=o["dtype"],
                                                 templates_dirs=templates, quant=o["text_encoder_quant"])
    if o["encoder_url"]:
        from ..server.remote import RemoteTextEncoder

        # Fail early (before the DiT loads) when the encoder machine is unreachable.
        RemoteTextEncoder(o["encoder_url"], o["encoder_token"], timeout=o.get("encoder_timeout", 120.0)).info()
    from .generate import check_speed_flags, load_pipeline

    check_speed_flags(o)
    pipe = load_pipeline(o)
    if o["encoder_url"]:
        pipe.text_encoder.timeout = o.get("encoder_timeout", 120.0)  # wait for answers this long
    pipe.templates_dirs = templates
    if o["tiled_vae"]:
        pipe.enable_vae_tiling(o["tile_size"], o["tile_overlap"])
    return PipelineEngine(pipe, model_name=o["model"] or DEFAULT_MODEL, templates_dirs=templates)


def default_options() -> dict:
    """Every ``zimage serve`` option at its default (the base of a Ray Serve config's args)."""
    ctx = click.Context(serve)
    out = {}
    for p in serve.params:
        if p.name and p.name not in ("config_path", "profile"):
            value = p.get_default(ctx)
            if type(value).__name__ == "Sentinel":  # click's "no default"
                value = None
            out[p.name] = tuple(value or ()) if p.multiple else value
    return out


def plan_ray_replicas(o: dict, cluster_gpus: float) -> tuple[dict, str | None]:
    """The replica count for ``--ray`` on a cluster with ``cluster_gpus`` GPUs, and a warning.

    Replicas that need more GPUs than the cluster has are never placed: Serve waits for them
    without a word. A local cluster (no ``--ray-address``) cannot grow, so that is an error naming
    the fix; a remote one may add GPU nodes (an autoscaler), so it is a warning."""
    per = o["gpus_per_replica"]
    if per < 0:
        raise ValueError(f"--gpus-per-replica must be >= 0, got {per}")
    fixed = o["replicas"] is None and o["min_replicas"] is None and o["max_replicas"] is None
    if fixed:
        o = {**o, "replicas": max(1, int(cluster_gpus // per)) if per > 0 else 1}
    first = o["replicas"] if o["replicas"] is not None else max(1, o["min_replicas"] or 0)
    needed = first * per
    if needed <= cluster_gpus:
        return o, None
    what = (f"{first} replica{'s' if first > 1 else ''} x --gpus-per-replica {per:g} = {needed:g} GPUs, and this "
            f"Ray cluster has {cluster_gpus:g}")
    hint = "; to run on the CPU (--fake, or a CPU model) pass --gpus-per-replica 0" if cluster_gpus == 0 else \
        "; ask for fewer replicas (--replicas) or fewer GPUs each (--gpus-per-replica)"
    if o["ray_address"] is None:
        raise ValueError(f"zimage serve --ray: the replicas would wait forever for GPUs: {what}{hint}")
    return o, f"the replicas wait until the Ray cluster has the GPUs they need: {what}{hint}"


def run_ray(o: dict) -> None:
    """``zimage serve --ray``: a Ray cluster (local, or --ray-address), the app, and wait."""
    try:
        import ray
        from ray import serve as ray_serve

        from ..server.ray_serve import build_app, scaling_options
    except ImportError as e:
        raise click.ClickException(f"zimage serve --ray needs the ray extra ({e.name} is missing): "
                                   f"pip install 'zimage-native[ray]'") from None
    import time

    settings = build_settings(o)  # validate before starting anything
    scaling_options(o)  # the replica counts too (--replicas 0 was deployed as 1, -1 refused once Ray had started)
    if o["ray_address"] is None:  # the ingress runs here: another server on its data folder is refused now
        from ..server.storage import DataDirLock

        DataDirLock(settings.data_dir).release()
    ray.init(address=o["ray_address"], ignore_reinit_error=True)
    try:
        o, warning = plan_ray_replicas(o, float(ray.cluster_resources().get("GPU", 0)))
    except ValueError:
        ray.shutdown()
        raise
    if warning:
        click.echo(f"warning: {warning}", err=True)
    try:
        ray_serve.start(http_options={"host": o["host"], "port": o["port"]})
        ray_serve.run(build_app(o), name="zimage", route_prefix="/")
        click.echo(f"zimage serve --ray: ready on http://{o['host']}:{o['port']}/ (Ctrl-C to stop)", err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # while deploying (the replicas load the model) too: no app is left deployed
        ray_serve.shutdown()
        raise  # 'interrupted', exit status 130, as `zimage serve` without --ray (cli.ZImageGroup)


def run_server(o: dict) -> None:
    if o["use_ray"] and o["llm_url"]:
        raise ValueError("--llm-url is not available with --ray yet; run the rewriting server without --ray")
    if o["use_ray"]:
        run_ray(o)
        return
    try:
        import uvicorn

        from ..server.app import create_app
        from ..server.storage import DataDirLock, check_history
    except ImportError as e:
        raise click.ClickException(f"zimage serve needs the server extra ({e.name} is missing): "
                                   f"pip install 'zimage-native[server]'") from None
    settings = build_settings(o)
    # What would fail only once the server starts, checked before the model loads (minutes, GBs).
    check_writable_folder(Path(settings.data_dir), "--data-dir")
    check_history(settings.data_dir)
    DataDirLock(settings.data_dir).release()  # another server on this folder: refused now, not after loading
    check_port_free(o["host"], o["port"])
    llm = chat_rewriter(o["llm_url"], o["llm_model"], o["llm_timeout"])
    if not _is_loopback(o["host"]) and not settings.token:
        click.echo(f"warning: listening on {o['host']} without --token: anyone who can reach this port can "
                   f"generate and delete images", err=True)
    engine = build_engine(o)
    if llm is not None:
        engine.llm_rewriter = llm  # /api/rewrite goes to the chat server
    warmup = o["warmup"] if o["warmup"] is not None else (o["compile_mode"] != "off" or o["cuda_graphs"])
    if warmup:
        click.echo("warming up on the worker thread (one generation at the default size)...", err=True)
    app = create_app(engine, settings, warmup=bool(warmup))
    repaired = {k: v for k, v in app.state.repaired.items() if v}
    if repaired:
        click.echo(f"history repaired at start-up: {repaired}", err=True)
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    host = o["host"]
    shown = f"[{host}]" if ":" in host else host

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else o["port"]
                app.state.data_lock.note(f"http://{shown}:{port}/")
                click.echo(f"zimage serve: {engine.model_name} ready on http://{shown}:{port}/ "
                           f"(queue {settings.queue_size}, data {settings.data_dir})", err=True)

    config = uvicorn.Config(app, host=host, port=o["port"], log_level="info" if verbose else "warning",
                            timeout_graceful_shutdown=10, access_log=verbose)
    Server(config).run()
