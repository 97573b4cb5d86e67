"""Server settings and request limits (all configurable; published by ``GET /api/v1/capabilities``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


def default_data_dir(fake: bool = False, encoder_only: bool = False) -> Path:
    """``$XDG_DATA_HOME/zimage-native/server``, else ``~/.local/share/zimage-native/server``.

    ``fake``: the fake engine's own folder (``server-fake`` next to it), so that its solid-colour
    images never mix with a real server's history. ``encoder_only``: ``server-encoder``, so that an
    encoder server and the generation server it feeds can run on one machine (a data folder serves
    one server at a time).
    """
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    name = "server-fake" if fake else "server-encoder" if encoder_only else "server"
    return Path(base) / "zimage-native" / name


INPUT_PIXELS_FACTOR = 6  # an input image may have this many times the pixels of the largest output
FORMAT_ALLOWANCE = 16000  # characters of a formatted prompt beyond its fields: chat markup, a template's text


@dataclass
class Limits:
    """What one request may ask for. Sizes must also be multiples of 16."""

    min_side: int = 256
    max_side: int = 2048
    max_pixels: int = 2048 * 2048  # about 4.2 megapixels
    max_steps: int = 100
    max_images: int = 4  # n per request
    max_guidance: float = 20.0
    max_prompt_chars: int = 4000  # each text field
    max_sequence_length: int = 1024  # the largest max_sequence_length a request may set
    max_upload_bytes: int = 16 * 1024 * 1024  # decoded img2img input
    # Pixels of an input image (image, mask, control image) once decoded: a small file can hold a
    # huge image. None: INPUT_PIXELS_FACTOR x max_pixels (a 24-megapixel photo with the defaults).
    max_input_pixels: int | None = None
    max_body_bytes: int = 24 * 1024 * 1024  # whole request body (base64 input included)
    max_texts: int = 16  # texts per /api/encode or /api/tokenize call
    # A pre-formatted text of /api/encode or /api/tokenize (what a --encoder-url server sends): the
    # chat format of a prompt with its system prompt, thinking and assistant content (each up to
    # max_prompt_chars) and a template's own text. None: 4 x max_prompt_chars + FORMAT_ALLOWANCE.
    max_formatted_chars: int | None = None
    max_new_tokens: int = 2048  # /api/rewrite
    max_control_scale: float = 2.0  # ControlNet conditioning scale

    def __post_init__(self):
        if self.max_formatted_chars is None:
            self.max_formatted_chars = 4 * self.max_prompt_chars + FORMAT_ALLOWANCE
        if self.max_input_pixels is None:
            self.max_input_pixels = INPUT_PIXELS_FACTOR * self.max_pixels

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ServerSettings:
    data_dir: Path = field(default_factory=default_data_dir)
    queue_size: int = 8  # jobs waiting behind the running ones; capacity is queue_size + workers
    workers: int = 1  # jobs run at once: 1 for one GPU; the number of replicas behind a Ray ingress
    token: str | None = None  # bearer token; None = no authentication
    limits: Limits = field(default_factory=Limits)
    max_history: int | None = None  # keep at most this many images (oldest pruned); None = all
    job_timeout: float | None = None  # seconds a job may run before it fails; None = no limit
    sync_timeout: float = 600.0  # seconds the synchronous routes wait for their job
    full_sync: bool = False  # SQLite synchronous=FULL (survives power loss), else NORMAL
    thumbnail_size: int = 256

    def __post_init__(self):
        self.data_dir = Path(self.data_dir)
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.token is not None and not self.token:
            self.token = None
