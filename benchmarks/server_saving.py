"""How long the server's generation worker waits on the history per image, and the jobs/s of a queue.

A stand-in engine "generates" a prepared 1024x1024 photo-like image after ``--gpu-s`` seconds of
sleep (the GPU's time); the real JobManager and Storage save it. Per job we log when the engine
was entered and left: the worker's gap between leaving one job's generate and entering the next
one's is what the GPU would idle. Run on the CPU:

    PYTHONPATH=. python benchmarks/server_saving.py --jobs 12 --gpu-s 0.8
    PYTHONPATH=. python benchmarks/server_saving.py --ray-head 10 --gpu-s   # the Ray ingress's store only
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

from zimage_native.server import Limits, ServerSettings
from zimage_native.server.engine import Engine, GeneratedImage, GenerationRequest
from zimage_native.server.jobs import JobManager
from zimage_native.server.storage import Storage


def photo_like(size: int = 1024, seed: int = 0) -> Image.Image:
    """Smooth colour fields with a little noise: about a photo's PNG size and encode time."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
    base = Image.fromarray(small).resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(4))
    noise = rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + noise, 0, 255).astype(np.uint8))


class StandInEngine(Engine):
    def __init__(self, gpu_s: float, image: Image.Image):
        super().__init__("stand-in")
        self.gpu_s = gpu_s
        self.image = image
        self.spans: list[tuple[float, float]] = []  # (entered, left) generate, per job

    def generate(self, request, callback):
        entered = time.perf_counter()
        if self.gpu_s:
            time.sleep(self.gpu_s)
        callback(request.steps, request.steps)
        out = [GeneratedImage(self.image, seed, {"prompt": request.prompt, "seed": seed, "width": self.image.width,
                                                  "height": self.image.height}) for seed in request.seeds]
        self.spans.append((entered, time.perf_counter()))
        return out


def run(jobs: int, gpu_s: float, image: Image.Image) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        limits = Limits(max_side=2048, max_pixels=2048 * 2048)
        settings = ServerSettings(data_dir=folder, limits=limits, queue_size=jobs)
        storage = Storage(folder)
        engine = StandInEngine(gpu_s, image)
        manager = JobManager(engine, storage, settings)
        submitted = [manager.submit(GenerationRequest(prompt=f"job {i}", width=image.width, height=image.height,
                                                      steps=1, seeds=[i])) for i in range(jobs)]
        t0 = time.perf_counter()
        manager.start()
        while not all(j.terminal for j in submitted):
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        manager.stop()
        storage.close()
        assert all(j.status == "completed" for j in submitted), [(j.status, j.error) for j in submitted]
        gaps = [b[0] - a[1] for a, b in zip(engine.spans, engine.spans[1:])]
        return {"jobs_per_s": jobs / elapsed, "elapsed": elapsed, "gap_ms_median": 1000 * statistics.median(gaps),
                "gap_ms_max": 1000 * max(gaps)}


def ray_head(image: Image.Image, repeats: int) -> dict:
    """Per image, what the Ray ingress does with a replica's PNG: before, decode it and store it
    (encode again); now, store its bytes and decode only for the thumbnail. Real Storage, fsync on."""
    import io

    from zimage_native.metadata import png_info, save_png

    record = {"prompt": "a photo", "seed": 1, "width": image.width, "height": image.height, "replica": "r1"}
    buffer = io.BytesIO()
    save_png(image, buffer, png_info(record))
    png = buffer.getvalue()
    times: dict[str, list[float]] = {"decode and encode again": [], "bytes as they are": []}
    with tempfile.TemporaryDirectory() as folder:
        storage = Storage(folder)
        for k in range(repeats):
            for name in times:
                t = time.perf_counter()
                if name == "bytes as they are":
                    storage.save_image("j" + "0" * 20, 2 * k, Image.open(io.BytesIO(png)), record, png=png)
                else:
                    decoded = Image.open(io.BytesIO(png)).copy()
                    storage.save_image("j" + "0" * 20, 2 * k + 1, decoded, record, png_info(record))
                times[name].append(time.perf_counter() - t)
        storage.close()
    return {name: 1000 * statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--gpu-s", type=float, nargs="*", default=[0.0, 0.8])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--ray-head", type=int, default=0, metavar="N",
                        help="also time N stores of a Ray replica's PNG on the ingress, both ways")
    args = parser.parse_args()
    image = photo_like(args.size)
    if args.ray_head:
        for name, ms in ray_head(image, args.ray_head).items():
            print(f"ray ingress, one {args.size}x{args.size} image, {name}: median {ms:.1f} ms")
    for gpu_s in args.gpu_s:
        r = run(args.jobs, gpu_s, image)
        ideal = 1 / gpu_s if gpu_s else float("inf")
        print(f"gpu {gpu_s:.2f} s/job, {args.jobs} jobs: {r['jobs_per_s']:.3f} jobs/s (GPU-bound ideal {ideal:.3f}), "
              f"worker gap between jobs: median {r['gap_ms_median']:.1f} ms, max {r['gap_ms_max']:.1f} ms")


if __name__ == "__main__":
    main()
