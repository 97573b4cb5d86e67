"""The prompt rewriter through an OpenAI-compatible chat server (vLLM, SGLang, llama.cpp's server,
Ollama, ...), the predecessor's API backend. No torch, no weights here: one HTTP request per rewrite.

The request is ``POST {url}/v1/chat/completions`` with the rewriter template's system prompt as the
system message and the user's prompt as the user message (``url`` may also end in ``/v1`` or be
the whole ``.../chat/completions`` address). Where the template asks for an empty think block (most
shipped rewriters: answer without reasoning), the request carries ``chat_template_kwargs:
{"enable_thinking": false}``, which Qwen3's chat template turns into that same empty block on
vLLM, SGLang and llama.cpp (servers that do not know the field ignore it). The reply's think block,
if any, is removed as the local rewriter removes it (:func:`strip_think`).

A template's ``thinking_content`` and ``assistant_content`` are not sent (a chat API has no portable
way to pre-fill the reply); no shipped rewriter uses them.

Failures raise :class:`ChatServerError` with the address and the reason: unreachable, an HTTP
status other than 2xx (with the server's own message), a timeout, or a reply that is not a chat
completion.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.error
import urllib.request

from .request import build_rewrite_text, check_sampling, resolve_rewriter, DEFAULT_REWRITER, strip_think
from .templates import Template, TemplateRegistry

logger = logging.getLogger(__name__)

__all__ = ["ChatRewriter", "ChatServerError", "chat_endpoint"]

DEFAULT_TIMEOUT = 120.0


class ChatServerError(RuntimeError):
    """The chat server could not be used: one line naming the address and the reason."""


def chat_endpoint(url: str) -> str:
    """The chat-completions address of a server given as ``http://host:port``, ``.../v1`` or the
    full ``.../v1/chat/completions``."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"llm_url must be an http:// or https:// address, got {url!r}")
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def _server_message(body: bytes) -> str:
    """The error text of a non-2xx answer: OpenAI's {"error": {"message": ...}}, or the body's start."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:200]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return " ".join(str(err).split())[:200]
    return " ".join(text.split())[:200]


class ChatRewriter:
    """Rewrite prompts with a model served by an OpenAI-compatible chat server.

    >>> rw = ChatRewriter("http://localhost:8000", "Qwen/Qwen3-4B")
    >>> rw.rewrite("a fox in the snow", rewriter="rewriter-cinematic", seed=0)

    ``model``: the served model's name (``--llm-model``; vLLM's ``--served-model-name``, Ollama's
    tag); None sends none, for servers with one model. ``api_key``: sent as a bearer token (default:
    $ZIMAGE_LLM_API_KEY). ``timeout``: seconds to wait for the whole answer.
    """

    def __init__(self, url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, template_registry: TemplateRegistry | None = None):
        self.endpoint = chat_endpoint(url)
        self.url = url
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("ZIMAGE_LLM_API_KEY")
        if not timeout > 0:
            raise ValueError(f"llm_timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.template_registry = template_registry

    def messages(self, prompt: str, rewriter: str | Template | None = None, system_prompt: str | None = None,
                 *, force_think_block: bool | None = None,
                 registry: TemplateRegistry | None = None) -> tuple[list[dict], bool]:
        """The chat messages of the request and whether to ask for an empty think block."""
        registry = registry if registry is not None else self.template_registry
        build_rewrite_text(prompt, rewriter, system_prompt, force_think_block=force_think_block,
                           registry=registry)  # the same checks as the local rewriter
        if rewriter is None and system_prompt is None:
            rewriter = DEFAULT_REWRITER
        if rewriter is not None:
            fields = resolve_rewriter(rewriter, registry).prompt_fields(system_prompt=system_prompt,
                                                                        force_think_block=force_think_block)
            system, no_thinking = fields.get("system_prompt"), bool(fields.get("force_think_block"))
        else:
            system, no_thinking = system_prompt, True if force_think_block is None else force_think_block
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return messages, no_thinking

    def rewrite(
        self,
        prompt: str,
        rewriter: str | Template | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.7,
        seed: int | None = None,
        top_p: float = 0.95,
        *,
        force_think_block: bool | None = None,
        registry: TemplateRegistry | None = None,
    ) -> str:
        """As the local rewriter's ``rewrite``; the server samples (``seed`` is passed on, and servers
        that honour it repeat their text)."""
        check_sampling(max_new_tokens, temperature, top_p)
        messages, no_thinking = self.messages(prompt, rewriter, system_prompt, force_think_block=force_think_block,
                                              registry=registry)
        body = {"messages": messages, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "stream": False}
        if self.model:
            body["model"] = self.model
        if seed is not None:
            body["seed"] = int(seed)
        if no_thinking:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        reply = self._post(body)
        text = strip_think(reply)
        if not text:
            logger.warning("the chat server's reply was empty or all reasoning; raise max_new_tokens or use a "
                           "rewriter with force_think_block")
        return text

    def _post(self, body: dict) -> str:
        where = f"the chat server at {self.endpoint}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _server_message(e.read() or b"")
            hint = ""
            if e.code == 404:
                hint = " (is the address the server's base, e.g. http://host:8000 or http://host:8000/v1, and the " \
                       "model name one it serves?)"
            elif e.code in (401, 403):
                hint = " (set ZIMAGE_LLM_API_KEY to the server's API key)"
            raise ChatServerError(f"{where} answered HTTP {e.code} {e.reason}: {detail or 'no message'}{hint}") from None
        except (TimeoutError, socket.timeout):
            raise ChatServerError(f"{where} did not answer within {self.timeout:g} s (raise the timeout, or check "
                                  f"that the server is not overloaded)") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise ChatServerError(f"{where} did not answer within {self.timeout:g} s (raise the timeout, or "
                                      f"check that the server is not overloaded)") from None
            text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
            raise ChatServerError(f"cannot reach {where}: {text} (is it running, and is the address right?)") from None
        except OSError as e:  # a connection reset mid-answer
            raise ChatServerError(f"cannot reach {where}: {e.strerror or e}") from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ChatServerError(f"{where} did not send a chat completion (expected choices[0].message.content; "
                                  f"got {' '.join(raw.decode('utf-8', 'replace').split())[:120]!r})") from None
        return content or ""
