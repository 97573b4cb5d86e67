"""Remote text encoding: the wire format of ``POST /api/encode`` and its client.

The distributed mode runs the Qwen3 text encoder on one machine (``zimage serve``, possibly with
``--encoder-only``) and the DiT on another, which then needs no encoder weights. The DiT side uses
:class:`RemoteTextEncoder` wherever the pipeline would use its local
:class:`~zimage_native.text_encoder.TextEncoder`: same ``encode``/``tokenize`` calls, same result.

Wire format of ``POST /api/encode`` (request JSON, response safetensors bytes):

- request, pre-formatted form (what this client sends; the texts are already in the chat format,
  exactly what the encoder reads)::

      {"texts": ["<|im_start|>user\\na cat<|im_end|>\\n<|im_start|>assistant\\n"], "max_sequence_length": 512}

- request, prompt form (the predecessor's; the server applies the chat format)::

      {"prompt": "a cat", "template": null, "system_prompt": null, "thinking_content": null,
       "assistant_content": null, "force_think_block": null, "strip_quotes": null, "max_sequence_length": 512}

  ``prompt`` may also be a list of prompts. Exactly one of ``texts`` and ``prompt`` must be given.
- response: ``application/octet-stream``, a safetensors file with tensors ``features.0`` ...
  ``features.{N-1}`` of shape (L_i, hidden) in the encoder's dtype, and string metadata
  ``format`` = ``zimage-features/1``, ``count`` (N), ``token_counts`` (JSON list), ``dtype``,
  ``hidden_size`` and ``texts`` (JSON list of the texts the encoder read).

This module needs only the standard library, torch and safetensors (no HTTP client package).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

import torch

FORMAT = "zimage-features/1"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def features_to_bytes(features: list[torch.Tensor], texts: list[str]) -> bytes:
    """Serialise encoder features (dtype and shape kept) with the metadata described above."""
    from safetensors.torch import save

    tensors = {f"features.{i}": f.detach().to("cpu").contiguous() for i, f in enumerate(features)}
    dtype = str(features[0].dtype).removeprefix("torch.") if features else ""
    meta = {"format": FORMAT, "count": str(len(features)), "dtype": dtype,
            "token_counts": json.dumps([int(f.shape[0]) for f in features]),
            "hidden_size": str(int(features[0].shape[-1])) if features else "0",
            "texts": json.dumps(texts, ensure_ascii=False)}
    return save(tensors, metadata=meta)


def features_from_bytes(data: bytes) -> tuple[list[torch.Tensor], dict[str, str]]:
    """The inverse of :func:`features_to_bytes`: (features in order, metadata)."""
    from safetensors.torch import load

    tensors = load(data)
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a zimage features payload (format {meta.get('format')!r}, expected {FORMAT!r})")
    count = int(meta.get("count", len(tensors)))
    try:
        features = [tensors[f"features.{i}"] for i in range(count)]
    except KeyError as e:
        raise ValueError(f"the features payload lacks tensor {e.args[0]}") from None
    return features, meta


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (header: 8-byte length, then JSON)."""
    if len(data) < 8:
        raise ValueError("the features payload is too short to be safetensors")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size].decode("utf-8"))
    return dict(header.get("__metadata__") or {})


class RemoteEncoderError(RuntimeError):
    """The remote encoder could not be reached or refused the request (the message says which).

    ``reachable``: False when no answer came (connection refused, timed out), True when the
    server answered with an error or with something unreadable. A server relaying the error
    answers 503 for the first and 502 for the second (``status``)."""

    def __init__(self, message: str, *, reachable: bool = True):
        super().__init__(message)
        self.reachable = reachable

    @property
    def status(self) -> int:
        return 502 if self.reachable else 503


class RemoteCallAborted(RemoteEncoderError):
    """The caller gave up while waiting for the remote encoder's answer (see :func:`abort_when`)."""


_abort = threading.local()


@contextlib.contextmanager
def abort_when(check: Callable[[], bool]) -> Iterator[None]:
    """While inside, a :class:`RemoteTextEncoder` call made on this thread that waits for its
    answer gives up (raises :class:`RemoteCallAborted`) once ``check()`` is true; checked a few
    times a second. The server's worker uses it so that a cancel or a job timeout takes effect
    while the encoder machine is slow or hangs."""
    previous = getattr(_abort, "check", None)
    _abort.check = check
    try:
        yield
    finally:
        _abort.check = previous


def abort_check() -> Callable[[], bool] | None:
    """The check of the innermost :func:`abort_when` on this thread (None outside one): other
    remote calls (a Ray replica's generation) give up on it too."""
    return getattr(_abort, "check", None)


class _ConnectionMixin:
    """An HTTP(S) connection whose connect has its own (short) timeout, then ``read_timeout`` for the
    answer, which an ``abort`` check may cut short: a watcher thread asks it a few times a second
    while the answer is awaited and, once it is true, shuts the socket down, which ends the blocked
    read at once (plain or TLS alike; waiting for the socket to become readable instead is fooled
    by TLS 1.3's session tickets, which arrive before any answer)."""

    def __init__(self, *args, read_timeout: float | None = None, abort=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.abort = abort

    def connect(self):
        super().connect()  # under the connect timeout (urlopen's timeout)
        self.sock.settimeout(self.read_timeout)

    def getresponse(self):
        if self.abort is None:
            return super().getresponse()
        done, aborted, sock = threading.Event(), threading.Event(), self.sock

        def watch() -> None:
            while not done.wait(0.2):
                if self.abort():
                    aborted.set()
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    return

        watcher = threading.Thread(target=watch, name="zimage-encoder-abort", daemon=True)
        watcher.start()
        try:
            return super().getresponse()
        except (OSError, http.client.HTTPException):
            if aborted.is_set():
                raise RemoteCallAborted("the request to the text encoder was given up (the job was cancelled or "
                                        "ran past its time limit)") from None
            raise
        finally:
            done.set()
            watcher.join()


class _HTTPConnection(_ConnectionMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ConnectionMixin, http.client.HTTPSConnection):
    pass


def _opener(read_timeout: float | None, abort) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies and all) with the connections above."""
    args = dict(read_timeout=read_timeout, abort=abort)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(functools.partial(_HTTPConnection, **args), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(functools.partial(_HTTPSConnection, **args), req,
                                context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


class RemoteTextEncoder:
    """A text encoder that runs on a ``zimage serve`` machine, reached over HTTP.

    Drop-in for the pipeline's :class:`~zimage_native.text_encoder.TextEncoder`:

    - ``encode(texts, max_sequence_length=None) -> list[Tensor]``: texts are already chat-formatted
      (the pipeline formats them); returns one (L_i, hidden) tensor per text, on the CPU, in the
      remote encoder's dtype, or cast to ``dtype`` when one was given here;
    - ``tokenize(texts, max_sequence_length=None) -> list[list[int]]``; ``token_counts(texts)``, the
      counts before the cut;
    - ``device`` (where features arrive: the CPU), ``dtype``, ``hidden_size``,
      ``max_sequence_length``; ``model`` and ``tokenizer`` are ``None`` (no local weights);
    - ``rewrite(prompt, ...)``: the prompt rewriter of the remote machine.

    ``url`` is the server's base URL (``http://host:8000``); ``token`` its bearer token, if any.
    ``timeout``: seconds to wait for an answer (``zimage serve --encoder-timeout``);
    ``connect_timeout``: seconds to wait for the connection (a machine that is down fails fast).
    """

    model = None
    tokenizer = None

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0,
                 dtype: torch.dtype | str | None = None, max_sequence_length: int = 512,
                 connect_timeout: float = 10.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"the encoder URL must start with http:// or https://, got {url!r}")
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
            dtype = _DTYPES[dtype]
        self._dtype = dtype
        self.max_sequence_length = max_sequence_length
        self._caps: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RemoteTextEncoder({self.url!r})"

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[bytes, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        opener = _opener(self.timeout, abort_check())
        try:
            with opener.open(request, timeout=min(self.connect_timeout, self.timeout)) as response:
                return response.read(), dict(response.headers.items())
        except urllib.error.HTTPError as e:
            detail = e.read()
            try:
                message = json.loads(detail)["error"]["message"]
            except Exception:  # noqa: BLE001 - any non-JSON error body
                message = detail.decode("utf-8", "replace")[:200] or e.reason
            hint = ""
            if e.code == 401:  # the token the encoder server was started with (its --token)
                hint = ("; the token given is not the server's --token (check --encoder-token or ZIMAGE_ENCODER_TOKEN)"
                        if self.token else
                        "; pass the server's --token with --encoder-token TOKEN (or set ZIMAGE_ENCODER_TOKEN)")
            raise RemoteEncoderError(f"{method} {self.url}{path}: HTTP {e.code}: {message}{hint}") from None
        except TimeoutError:  # connected, but no answer in time (a connect timeout comes as a URLError)
            raise RemoteEncoderError(f"the text encoder at {self.url} did not answer {method} {path} within "
                                     f"{self.timeout:g} s (zimage serve --encoder-timeout)", reachable=False) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise RemoteEncoderError(f"cannot reach the text encoder at {self.url}: {reason}",
                                     reachable=False) from None

    def _json(self, method: str, path: str, body: dict | None = None) -> Any:
        data, _ = self._request(method, path, body)
        return json.loads(data)

    # ------------------------------------------------------------------ facts
    def _capabilities(self) -> dict[str, Any]:
        if self._caps is None:
            self._caps = dict(self._json("GET", "/api/v1/capabilities"))
        return self._caps

    def info(self) -> dict[str, Any]:
        """The remote text encoder's facts (dtype, hidden_size, max_sequence_length, device); cached."""
        return dict(self._capabilities().get("text_encoder") or {})

    def limits(self) -> dict[str, Any]:
        """The remote server's request limits (``max_texts``, ``max_formatted_chars``, ...); cached."""
        return dict(self._capabilities().get("limits") or {})

    def _batches(self, texts: list[str]) -> list[list[str]]:
        """``texts`` in calls the server takes (at most its ``max_texts`` each); a text over its
        length limit is an error here, naming the limit, rather than the server's 422."""
        limits = self.limits()
        longest = limits.get("max_formatted_chars")
        for text in texts:
            if longest is not None and len(text) > longest:
                raise RemoteEncoderError(
                    f"a formatted prompt is {len(text)} characters long; the text encoder at {self.url} takes at "
                    f"most {longest} (shorten the prompt or its system prompt, thinking or assistant content)")
        size = max(1, int(limits.get("max_texts") or 16))
        return [texts[i:i + size] for i in range(0, len(texts), size)]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        if self._dtype is not None:
            return self._dtype
        name = self.info().get("dtype", "float32")
        return _DTYPES.get(name, torch.float32)

    @property
    def hidden_size(self) -> int:
        return int(self.info()["hidden_size"])

    # ------------------------------------------------------------------ the encoder interface
    def encode(self, texts: list[str], max_sequence_length: int | None = None) -> list[torch.Tensor]:
        texts = list(texts)
        if not texts:
            return []
        limit = max_sequence_length or self.max_sequence_length
        features: list[torch.Tensor] = []
        for batch in self._batches(texts):
            data, _ = self._request("POST", "/api/encode", {"texts": batch, "max_sequence_length": limit})
            try:
                part, _ = features_from_bytes(data)
            except ValueError as e:
                raise RemoteEncoderError(f"{self.url}/api/encode: {e}") from None
            if len(part) != len(batch):
                raise RemoteEncoderError(f"{self.url}/api/encode returned {len(part)} features for {len(batch)} texts")
            features += part
        if self._dtype is not None:
            features = [f.to(self._dtype) for f in features]
        return features

    def tokenize(self, texts: list[str], max_sequence_length: int | None = None) -> list[list[int]]:
        limit = max_sequence_length or self.max_sequence_length
        ids: list[list[int]] = []
        for batch in self._batches(list(texts)):
            ids += self._json("POST", "/api/tokenize", {"texts": batch, "max_sequence_length": limit})["input_ids"]
        return ids

    def token_counts(self, texts: list[str]) -> list[int] | None:
        """Each text's token count before the cut to max_sequence_length (None: the encoder's
        server is older than this count)."""
        counts: list[int] = []
        for batch in self._batches(list(texts)):  # max_sequence_length 1: the ids are not wanted
            full = self._json("POST", "/api/tokenize", {"texts": batch, "max_sequence_length": 1}).get(
                "full_token_counts")
            if full is None or len(full) != len(batch):
                return None
            counts += full
        return counts

    def rewrite(self, prompt: str, rewriter: str | None = None, system_prompt: str | None = None,
                max_new_tokens: int = 512, temperature: float = 0.7, seed: int | None = None, top_p: float = 0.95,
                *, force_think_block: bool | None = None) -> str:
        body = dict(prompt=prompt, rewriter=rewriter, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                    temperature=temperature, seed=seed, top_p=top_p, force_think_block=force_think_block)
        return self._json("POST", "/api/rewrite", body)["rewritten"]
