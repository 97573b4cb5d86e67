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
    with pytest.raises(HubError, match=f"cannot fetch the tokenizer of {REPO} .*no network") as caught:
        resolve_tokenizer_folder(REPO)
    assert "--tokenizer FOLDER" in str(caught.value) and "--model" not in str(caught.value)  # the flag that helps
    with pytest.raises(HubError, match=f"cannot fetch the text encoder of {REPO} .*no network"):
        _rewriter_folder(REPO)


def test_a_checkpoint_file_given_as_the_model_folder_points_to_transformer(tmp_path):
    from zimage_native.hub import resolve_model_folder

    checkpoint = tmp_path / "z_image_turbo_bf16.safetensors"
    checkpoint.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"is a file; .*--transformer FILE"):
        resolve_model_folder(checkpoint)


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


# ----------------------------------------------------------------------------- disk space, before downloading
GB = 10**9


@pytest.fixture
def snapshot_folder(tmp_path):
    """What a finished download leaves: a folder with the files check_model_folder asks for."""
    folder = tmp_path / "snapshot"
    for name in ("transformer/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


@pytest.fixture
def hub_listing(monkeypatch, tmp_path, snapshot_folder):
    """The Hub lists a Z-Image-like repository (sizes only); the download returns a finished folder."""
    from collections import namedtuple
    from types import SimpleNamespace

    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    import zimage_native.hub as hub

    files = [RepoSibling("model_index.json", size=500, blob_id="b0"),
             RepoSibling("transformer/config.json", size=700, blob_id="b1"),
             RepoSibling("transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                         lfs=BlobLfsInfo(size=20 * GB, sha256="s1", pointer_size=130)),
             RepoSibling("transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
                         lfs=BlobLfsInfo(size=5 * GB, sha256="s2", pointer_size=130)),
             RepoSibling("text_encoder/model.safetensors", lfs=BlobLfsInfo(size=8 * GB, sha256="s3", pointer_size=130)),
             RepoSibling("vae/diffusion_pytorch_model.safetensors",
                         lfs=BlobLfsInfo(size=GB // 5, sha256="s4", pointer_size=130)),
             RepoSibling("transformer/diffusion_pytorch_model.bin",  # not downloaded: not in HUB_FILES
                         lfs=BlobLfsInfo(size=25 * GB, sha256="s5", pointer_size=130))]
    state = {"free": 100 * GB, "asked": 0, "downloaded": 0, "fail": None}

    def model_info(self, repo_id, revision=None, files_metadata=False, **_):
        state["asked"] += 1
        assert files_metadata
        if state["fail"]:
            raise state["fail"]
        return SimpleNamespace(siblings=files)

    def snapshot_download(repo_id, **kwargs):
        state["downloaded"] += 1
        return str(snapshot_folder)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: Usage(2 * state["free"], state["free"], state["free"]))
    return state


def test_a_download_the_disk_cannot_hold_is_refused_before_it_starts(hub_listing, tmp_path):
    hub_listing["free"] = 30 * GB  # the safetensors weights are 33.2 GB
    with pytest.raises(HubError) as info:
        resolve_model_folder(REPO)
    assert str(info.value) == (
        f"cannot fetch the model {REPO} from the Hugging Face Hub: it needs 33.20 GB in the cache "
        f"{tmp_path / 'cache'}, and that disk has 30.00 GB free; free space there, or set HF_HUB_CACHE to a folder "
        "on a larger disk, or give a local folder instead (--model /path/to/folder on the command line)")
    assert hub_listing["downloaded"] == 0


def test_what_the_cache_holds_or_is_not_fetched_does_not_count(hub_listing, tmp_path, snapshot_folder):
    hub_listing["free"] = 10 * GB
    blobs = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "s1").touch()  # the first 20 GB shard is already there: 13.2 GB to fetch
    with pytest.raises(HubError, match="it needs 13.20 GB in the cache"):
        resolve_model_folder(REPO)
    (blobs / "s3").touch()  # and the text encoder: 5.2 GB
    assert resolve_model_folder(REPO) == snapshot_folder
    assert hub_listing["downloaded"] == 1
    # a DiT from a single file: its Hub weights are not fetched (0.2 GB left)
    hub_listing["free"] = GB // 2
    (blobs / "s3").unlink()
    with pytest.raises(HubError, match="it needs 8.20 GB"):
        resolve_model_folder(REPO, skip_weights=("transformer",))
    resolve_model_folder(REPO, skip_weights=("transformer", "text_encoder"))


def test_the_space_check_steps_aside_offline_or_when_the_hub_cannot_be_asked(hub_listing, monkeypatch):
    hub_listing["free"] = GB
    hub_listing["fail"] = ConnectionError("no route to host")
    resolve_model_folder(REPO)  # the download itself would say why it fails
    assert hub_listing["asked"] == 1 and hub_listing["downloaded"] == 1
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    resolve_model_folder(REPO)
    resolve_model_folder(REPO, local_files_only=True)
    assert hub_listing["asked"] == 1 and hub_listing["downloaded"] == 3


def test_the_rewriter_download_is_checked_too(hub_listing):
    from zimage_native.prompt.rewriter import _rewriter_folder

    hub_listing["free"] = 5 * GB
    with pytest.raises(HubError, match=f"^cannot fetch the text encoder of {REPO} from the Hugging Face Hub: it "
                                       "needs 8.00 GB in the cache"):
        _rewriter_folder(REPO)
    assert hub_listing["downloaded"] == 0
