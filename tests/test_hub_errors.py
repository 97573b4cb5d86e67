"""Hub failures name the model, say why and what to do, with a mocked hub: huggingface_hub's
snapshot_download replaced by one that raises what the real one raises (the HTTP errors are made by
huggingface_hub's own hf_raise_for_status from fake responses)."""

from __future__ import annotations

import errno

import huggingface_hub
import pytest
from click.testing import CliRunner
from huggingface_hub import errors
from huggingface_hub.utils import hf_raise_for_status

from zimage_native.cli import main
from zimage_native.hub import HubError, resolve_model_folder, resolve_tokenizer_folder

# The HTTP client huggingface_hub uses: requests before 1.0 (transformers 4.x pins it there), httpx after.
REQUESTS = int(huggingface_hub.__version__.split(".")[0]) < 1
client = pytest.importorskip("requests" if REQUESTS else "httpx2" if hasattr(huggingface_hub.utils, "_http") and hasattr(
    huggingface_hub.utils._http, "httpx2") else "httpx")

REPO = "someone/some-model"


def fake_response(status: int, headers: dict, url: str):
    if not REQUESTS:
        return client.Response(status, headers=headers, request=client.Request("GET", url))
    response = client.Response()
    response.status_code, response.url, response.reason = status, url, "error"
    response.headers.update(headers)
    response.request = client.Request("GET", url).prepare()
    return response


def http_error(status: int, code: str | None) -> Exception:
    url = f"https://huggingface.co/api/models/{REPO}/revision/main"
    response = fake_response(status, {"X-Error-Code": code} if code else {}, url)
    try:
        hf_raise_for_status(response)
    except Exception as e:
        return e
    raise AssertionError("no error raised")


def no_network() -> Exception:
    try:
        try:
            connect_error = client.ConnectionError if REQUESTS else client.ConnectError
            raise connect_error("[Errno -2] Name or service not known")
        except Exception as cause:
            raise errors.LocalEntryNotFoundError(
                "An error happened while trying to locate the files on the Hub, and we cannot find the "
                "appropriate snapshot folder for the specified revision on the local disk.") from cause
    except Exception as e:
        return e


def offline_cache_miss() -> Exception:
    try:
        try:
            raise errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models: offline mode is enabled.")
        except Exception as cause:
            raise errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder") from cause
    except Exception as e:
        return e


def disk_full() -> Exception:
    return OSError(errno.ENOSPC, "No space left on device")


CASES = {
    "no network": (no_network, ["no network connection",
                                f"{'ConnectionError' if REQUESTS else 'ConnectError'}: [Errno -2] Name or service not known",
                                "--model /path/to/folder", "HF_HUB_OFFLINE=1", "/hf-cache"]),
    "offline, cache incomplete": (offline_cache_miss, ["HF_HUB_OFFLINE=1 is set", "no complete copy",
                                                       "/hf-cache", "--model /path/to/folder"]),
    "not found": (lambda: http_error(404, "RepoNotFound"), ["no such repository", "check the id", "HF_TOKEN",
                                                            "--model /path/to/folder"]),
    "private, no token": (lambda: http_error(401, None), ["no such repository", "HF_TOKEN"]),
    "gated": (lambda: http_error(403, "GatedRepo"), ["gated repository", f"https://huggingface.co/{REPO}",
                                                     "HF_TOKEN", "--model /path/to/folder"]),
    "revision": (lambda: http_error(404, "RevisionNotFound"), ["no such revision"]),
    "disk full": (disk_full, ["the disk is full", "No space left on device", "/hf-cache", "HF_HUB_CACHE"]),
    "server error": (lambda: http_error(503, None), ["the Hub answered", "503", "try again later"]),
}


@pytest.fixture
def failing_hub(monkeypatch):
    def install(make_error):
        def snapshot_download(repo_id, **kwargs):
            raise make_error()

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/hf-cache")
    return install


@pytest.mark.parametrize("case", list(CASES))
def test_library_error_names_the_model_the_reason_and_the_fix(failing_hub, case):
    make_error, phrases = CASES[case]
    failing_hub(make_error)
    with pytest.raises(HubError) as info:
        resolve_model_folder(REPO)
    message = str(info.value)
    assert message.startswith(f"cannot fetch the model {REPO} from the Hugging Face Hub: ")
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


def test_tokenizer_and_rewriter_downloads_name_what_they_fetch(failing_hub):
    from zimage_native.prompt.rewriter import _rewriter_folder

    failing_hub(no_network)
    with pytest.raises(HubError, match=f"cannot fetch the tokenizer of {REPO} .*no network"):
        resolve_tokenizer_folder(REPO)
    with pytest.raises(HubError, match=f"cannot fetch the text encoder of {REPO} .*no network"):
        _rewriter_folder(REPO)


def test_local_files_only_names_that_switch(failing_hub):
    failing_hub(lambda: errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"))
    with pytest.raises(HubError, match="local_files_only is set and the cache /hf-cache has no complete copy"):
        resolve_model_folder(REPO, local_files_only=True)


def test_other_errors_pass_through(failing_hub):
    failing_hub(lambda: ValueError("Invalid repo type"))
    with pytest.raises(ValueError, match="Invalid repo type"):
        resolve_model_folder(REPO)


@pytest.mark.parametrize("case", ["no network", "not found", "gated", "disk full"])
def test_cli_prints_the_whole_explanation_on_one_line(failing_hub, case):
    make_error, phrases = CASES[case]
    failing_hub(make_error)
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", REPO, "--device", "cpu", "-o", "/tmp/x.png"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot fetch the model {REPO}"), result.output
    for phrase in phrases:
        assert phrase in lines[0]


@pytest.mark.parametrize("args", [["format-prompt", "a cat", "--tokens", "--model", REPO],
                                  ["rewrite", "a cat", "--model", REPO]], ids=["format-prompt", "rewrite"])
def test_other_commands_that_fetch_from_the_hub_fail_in_one_line(failing_hub, args):
    failing_hub(no_network)
    result = CliRunner().invoke(main, args, prog_name="zimage")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot fetch the ") and "no network connection" in lines[0]
