"""The rewriter through an OpenAI-compatible chat server, against a local fake server (stdlib
http.server in a thread): the request it sends, think blocks stripped, and the errors (unreachable,
non-2xx, timeout, not a chat completion); the CLI, the pipeline and the server use it."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from zimage_native.cli import main
from zimage_native.prompt.remote import ChatRewriter, ChatServerError, chat_endpoint
from zimage_native.prompt.templates import default_registry


class FakeChatServer:
    """Answers POST /v1/chat/completions with ``reply`` (or ``status`` and an OpenAI error body, or
    after ``delay`` seconds); records every request body."""

    def __init__(self):
        self.reply = "<think>\nthe user wants a fox\n</think>\n\nA red fox in deep snow, morning light."
        self.status = 200
        self.delay = 0.0
        self.raw = None
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self.headers: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.paths.append(self.path)
                fake.headers.append(dict(self.headers))
                time.sleep(fake.delay)
                if fake.raw is not None:
                    out = fake.raw
                elif fake.status != 200 or self.path != "/v1/chat/completions":
                    status = fake.status if fake.status != 200 else 404
                    out = json.dumps({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                "type": "NotFoundError", "code": status}}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                    return
                else:
                    out = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": fake.reply}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat():
    with FakeChatServer() as server:
        yield server


def test_request_uses_the_template_as_system_prompt_and_strips_the_think_block(chat):
    rw = ChatRewriter(chat.url, "qwen3-4b")
    text = rw.rewrite("a fox", rewriter="rewriter-cinematic", max_new_tokens=300, temperature=0.5, top_p=0.9, seed=7)
    assert text == "A red fox in deep snow, morning light."
    assert chat.paths == ["/v1/chat/completions"]
    body = chat.requests[0]
    template = default_registry().get("rewriter-cinematic")
    assert body["messages"] == [{"role": "system", "content": template.system_prompt},
                                {"role": "user", "content": "a fox"}]
    assert body["model"] == "qwen3-4b" and body["max_tokens"] == 300 and body["seed"] == 7
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["stream"] is False
    assert body["chat_template_kwargs"] == {"enable_thinking": False}  # the template's empty think block


def test_default_rewriter_adhoc_system_prompt_and_letting_qwen3_reason(chat):
    rw = ChatRewriter(chat.url + "/v1/")
    rw.rewrite("a fox")
    default = default_registry().get("rewriter-faithful-expansion")
    assert chat.requests[0]["messages"][0] == {"role": "system", "content": default.system_prompt}
    assert "model" not in chat.requests[0] and "seed" not in chat.requests[0]
    rw.rewrite("a fox", system_prompt="Be brief.", force_think_block=False)
    assert chat.requests[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "chat_template_kwargs" not in chat.requests[1]
    assert chat.paths == ["/v1/chat/completions"] * 2


@pytest.mark.parametrize("reply, expected", [
    ("</think>\n\nOnly the answer.", "Only the answer."),  # the block opened in the request
    ("Answer first. <think>ran out of tokens", "Answer first."),
    ("<think>a</think>One<think>b</think> two", "One two"),
    ("<think>all reasoning</think>", ""),
])
def test_think_blocks_are_stripped_as_the_local_rewriter_strips_them(chat, reply, expected):
    from zimage_native.prompt.request import strip_think

    chat.reply = reply
    assert ChatRewriter(chat.url).rewrite("a fox") == expected == strip_think(reply)


def test_api_key_is_sent_as_a_bearer_token(chat, monkeypatch):
    monkeypatch.setenv("ZIMAGE_LLM_API_KEY", "sekrit")
    ChatRewriter(chat.url).rewrite("a fox")
    assert chat.headers[0]["Authorization"] == "Bearer sekrit"


def test_unreachable_server(refused_url):
    url = refused_url
    with pytest.raises(ChatServerError, match=rf"cannot reach the chat server at {url}/v1/chat/completions: "
                                              r".*[Cc]onnection refused.*is it running"):
        ChatRewriter(url).rewrite("a fox")


@pytest.mark.parametrize("status, phrase", [
    (404, "answered HTTP 404 Not Found: The model `nope` does not exist. (is the address the server's base"),
    (500, "answered HTTP 500 Internal Server Error: The model `nope` does not exist."),
    (401, "answered HTTP 401 Unauthorized: The model `nope` does not exist. (set ZIMAGE_LLM_API_KEY"),
])
def test_non_2xx_answers_name_the_status_and_the_servers_message(chat, status, phrase):
    chat.status = status
    with pytest.raises(ChatServerError) as info:
        ChatRewriter(chat.url, "nope").rewrite("a fox")
    assert str(info.value).startswith(f"the chat server at {chat.url}/v1/chat/completions {phrase}"), str(info.value)


def test_timeout(chat):
    chat.delay = 1.5
    with pytest.raises(ChatServerError, match=r"did not answer within 0.3 s"):
        ChatRewriter(chat.url, timeout=0.3).rewrite("a fox")


def test_not_a_chat_completion(chat):
    chat.raw = b'{"object": "list", "data": []}'
    with pytest.raises(ChatServerError, match=r"did not send a chat completion"):
        ChatRewriter(chat.url).rewrite("a fox")


def test_bad_input_is_refused_before_any_request(chat):
    rw = ChatRewriter(chat.url)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rw.rewrite("a fox", max_new_tokens=0)
    with pytest.raises(KeyError, match="unknown rewriter"):
        rw.rewrite("a fox", rewriter="rewriter-nope")
    with pytest.raises(ValueError, match="http"):
        ChatRewriter("localhost:8000")
    assert chat.requests == []
    assert chat_endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_cli_rewrite_through_the_server_without_torch(chat):
    """`zimage rewrite --llm-url` prints the rewritten prompt, and imports no torch (fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; from zimage_native.cli import main\n"
            "try:\n    main(sys.argv[1:], prog_name='zimage')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "rewrite", "a fox", "--llm-url", chat.url, "--llm-model", "m",
                          "--rewriter", "rewriter-photoreal", "--seed", "3"], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["A red fox in deep snow, morning light.", "TORCH False"]
    assert chat.requests[0]["model"] == "m" and chat.requests[0]["seed"] == 3


def test_cli_errors_are_one_line(refused_url):
    url = refused_url
    result = CliRunner().invoke(main, ["rewrite", "a fox", "--llm-url", url], prog_name="zimage")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot reach the chat server at {url}"), result.output
    result = CliRunner().invoke(main, ["rewrite", "a fox", "--llm-model", "m"], prog_name="zimage")
    assert result.exit_code == 1 and "--llm-model needs --llm-url" in result.output


def test_pipeline_rewrite_with_llm_url(chat, tiny_pipe):
    """pipe.rewrite(..., llm_url=...) goes to the server and loads no rewriter LM."""
    tiny_pipe.unload_rewriter()  # the session's shared pipe may hold one from another test
    text = tiny_pipe.rewrite("a fox", rewriter="rewriter-concise", llm_url=chat.url, llm_model="m", seed=1)
    assert text == "A red fox in deep snow, morning light."
    assert chat.requests[0]["messages"][0]["content"] == default_registry().get("rewriter-concise").system_prompt
    assert getattr(tiny_pipe, "_rewriter_lm", None) is None


def test_server_rewrite_route_uses_the_chat_server(chat, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from zimage_native.server import FakeEngine, ServerSettings, create_app

    engine = FakeEngine(step_delay=0.0)
    engine.llm_rewriter = ChatRewriter(chat.url, "m")
    with TestClient(create_app(engine, ServerSettings(data_dir=tmp_path, queue_size=1))) as client:
        r = client.post("/api/rewrite", json={"prompt": "a fox", "rewriter": "rewriter-cinematic"})
        assert r.status_code == 200, r.text
        assert r.json()["rewritten"] == "A red fox in deep snow, morning light."
        assert chat.requests[0]["messages"][1] == {"role": "user", "content": "a fox"}
        chat.status = 500
        r = client.post("/api/rewrite", json={"prompt": "a fox"})
        assert r.status_code == 502 and "answered HTTP 500" in r.text


def test_zimage_serve_llm_url_wires_the_rewrite_route(chat, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: apps.append(self.config.app))
    result = CliRunner().invoke(main, ["serve", "--fake", "--data-dir", str(tmp_path), "--port", "0",
                                       "--llm-url", chat.url, "--llm-model", "served-name"], prog_name="zimage")
    assert result.exit_code == 0, result.output
    with TestClient(apps[0]) as client:
        assert client.get("/api/rewriters").json()["available"] is True
        r = client.post("/api/rewrite", json={"prompt": "a fox"})
        assert r.status_code == 200 and r.json()["rewritten"] == "A red fox in deep snow, morning light."
    assert chat.requests[0]["model"] == "served-name"
