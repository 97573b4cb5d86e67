"""Generation features: img2img parity, seeds, variants, templates and prompt fields, tiled VAE, offload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_native.pipeline import ZImagePipeline, detect_variant, preprocess_image
from zimage_native.config import SchedulerConfig

from .utils import assert_rel, rel_err


def make_image(w=80, h=48, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
    return Image.fromarray(((base + rng.integers(0, 60, (h, w, 3))) % 256).astype("uint8"))


@pytest.fixture(scope="module")
def reference_img2img(reference_pipe):
    import diffusers

    pipe = diffusers.ZImageImg2ImgPipeline(**reference_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "strength, extra",
    [
        pytest.param(0.6, {}, id="strength 0.6"),
        pytest.param(1.0, {}, id="strength 1"),
        pytest.param(0.3, {"guidance_scale": 3.0, "negative_prompt": "blurry"}, id="strength 0.3 with CFG"),
        pytest.param(0.6, {"num_images_per_prompt": 2}, id="one image, two outputs"),
    ],
)
def test_img2img_matches_diffusers(tiny_pipe, reference_img2img, strength, extra):
    image = make_image(83, 50)  # not a multiple of 16: resized down to 80x48
    kw = dict(strength=strength, num_inference_steps=5, output_type="latent", **extra)
    expected = reference_img2img("a cat", image=image, generator=torch.Generator().manual_seed(3),
                                 **{"guidance_scale": 0.0, **kw}).images
    got = tiny_pipe.img2img("a cat", image, seed=3, **kw).images
    assert got.shape == (kw.get("num_images_per_prompt", 1), 16, 6, 10)
    assert_rel(got, expected, 1e-5, "img2img final latents")


def test_img2img_with_generator_list_matches_diffusers(tiny_pipe, reference_img2img):
    image = make_image(64, 64)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    expected = reference_img2img(["a cat", "a dog"], image=image, generator=gens(), guidance_scale=0.0,
                                 num_inference_steps=4, output_type="latent").images
    got = tiny_pipe.img2img(["a cat", "a dog"], image, generator=gens(), num_inference_steps=4,
                            output_type="latent").images
    assert_rel(got, expected, 1e-5, "img2img with a generator list")


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_one_input_image_with_a_seed_per_output_remakes_each_alone(tiny_pipe, task):
    """The CLI and the server record seed S+k for image k of a batch over one input image: that
    seed alone must give the image (diffusers' generator lists draw every image's posterior sample
    from the first generator, so image k would also depend on seed S)."""
    image = make_image(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    extra = {"mask_image": mask} if task == "inpaint" else {}
    kw = dict(num_inference_steps=3, output_type="latent", strength=0.6, **extra)
    both = getattr(tiny_pipe, task)("a cat", image, seed=[5, 6], **kw)
    assert both.images.shape[0] == 2 and both.seeds == [5, 6]
    for k, seed in enumerate((5, 6)):
        alone = getattr(tiny_pipe, task)("a cat", image, seed=seed, **kw).images
        assert_rel(both.images[k:k + 1], alone, 1e-5, f"{task} image {k} against seed {seed} alone")


def test_input_images_pair_with_their_prompts(tiny_pipe):
    """One image per prompt goes to each of that prompt's images ([i0, i0, i1, i1] for 2 prompts x
    2), as the ControlNet tasks pair control images (diffusers' img2img would give prompt 0 the
    second image); each output equals its prompt, image and seed run alone."""
    images = [make_image(32, 32), make_image(32, 32).rotate(90)]
    kw = dict(num_inference_steps=3, output_type="latent", strength=0.6)
    out = tiny_pipe.img2img(["a cat", "a dog"], images, num_images_per_prompt=2, seed=[1, 2, 3, 4], **kw)
    for k, (prompt, image, seed) in enumerate(zip(["a cat", "a cat", "a dog", "a dog"],
                                                   [images[0], images[0], images[1], images[1]], [1, 2, 3, 4])):
        alone = tiny_pipe.img2img(prompt, image, seed=seed, **kw).images
        assert_rel(out.images[k:k + 1], alone, 1e-5, f"image {k}")
    with pytest.raises(ValueError, match="give one, one per prompt, or one per image"):
        tiny_pipe.img2img(["a cat", "a dog"], images + images[:1], num_images_per_prompt=2, **kw)


def test_img2img_rejects_bad_input(tiny_pipe):
    with pytest.raises(ValueError, match="strength"):
        tiny_pipe.img2img("a cat", make_image(), strength=1.5)
    with pytest.raises(ValueError, match="leaves no step"):
        tiny_pipe.img2img("a cat", make_image(), strength=0.0, num_inference_steps=4)
    with pytest.raises(ValueError, match="PIL image"):
        tiny_pipe.img2img("a cat", "cat.png")  # numpy and torch images are accepted (tests/test_sampling.py)


def test_preprocess_rounds_down_to_multiples_of_16():
    x = preprocess_image(make_image(83, 50))
    assert x.shape == (1, 3, 48, 80) and x.min() >= -1 and x.max() <= 1


def test_integer_arrays_16_bit_and_palette_images_read_as_their_pixels():
    """An image read with np.asarray(pil) (uint8) or a uint8 tensor equals the same pixels given as
    floats in [0, 1]; float values past 1 are refused; a 16-bit grey PNG (a depth map) keeps its
    grey levels instead of clipping to white; a palette image equals its RGB conversion."""
    rgb = make_image(48, 32)
    pixels = np.array(rgb)
    expected = preprocess_image(pixels.astype(np.float32) / 255)
    assert torch.equal(preprocess_image(pixels), expected)
    assert torch.equal(preprocess_image(torch.from_numpy(pixels).permute(2, 0, 1)[None]), expected)
    assert torch.equal(preprocess_image(pixels.astype(np.uint16) * 257), expected)  # 16 bits
    with pytest.raises(ValueError, match="divide by 255"):
        preprocess_image(pixels.astype(np.float32))
    with pytest.raises(ValueError, match="integer images must be uint8"):  # int64 0-255 would read as black
        preprocess_image(pixels.astype(np.int64))
    assert float(preprocess_image(torch.ones(1, 3, 16, 16, dtype=torch.bool)).min()) == 1.0  # bool: 0/1
    depth = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    grey = preprocess_image(Image.fromarray(depth))
    assert grey.shape == (1, 3, 32, 48) and torch.equal(grey[:, 0], grey[:, 2])
    assert abs(float(grey.mean())) < 0.01 and float(grey.min()) == -1.0  # a ramp from black to white
    assert torch.equal(preprocess_image(Image.fromarray(depth).convert("I")), grey)
    palette = rgb.convert("P")
    assert torch.equal(preprocess_image(palette, 32, 32), preprocess_image(palette.convert("RGB"), 32, 32))


def test_tensor_images_below_0_are_read_as_minus_1_to_1_with_a_warning(caplog):
    """As diffusers (which warns that this is deprecated): values below 0 mean a [-1, 1] image. A
    [0, 1] image that a bicubic resize pushed just below 0 is read so too, silently before: the
    warning says to clamp it."""
    from zimage_native.images import preprocess_image

    x = torch.rand(1, 3, 32, 32) * 0.9
    with caplog.at_level("WARNING", logger="zimage_native.images"):
        assert torch.equal(preprocess_image(x), x * 2 - 1)
        assert not caplog.records
        x[0, 0, 0, 0] = -0.01
        assert torch.equal(preprocess_image(x), x)
    assert "read as [-1, 1]" in caplog.text and "-0.01" in caplog.text


def test_seed_list_gives_each_image_its_own_seed(tiny_pipe):
    kw = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
    both = tiny_pipe(["a cat", "a dog"], seed=[11, 12], **kw)
    assert both.seeds == [11, 12]
    alone = tiny_pipe("a dog", seed=12, **kw).images
    assert rel_err(both.images[1:], alone) < 1e-5
    with pytest.raises(ValueError, match="seeds for 2 images"):
        tiny_pipe(["a cat", "a dog"], seed=[1, 2, 3], **kw)


def test_variant_detection_and_defaults(tiny_model_dir):
    assert detect_variant("Tongyi-MAI/Z-Image-Turbo", SchedulerConfig(shift=3.0)) == "turbo"
    assert detect_variant("Tongyi-MAI/Z-Image", SchedulerConfig(shift=6.0)) == "base"
    assert detect_variant("/models/zimage", SchedulerConfig(shift=6.0)) == "base"
    assert detect_variant("/models/zimage/", SchedulerConfig(shift=3.0)) == "turbo"  # the folder's scheduler says
    single = SchedulerConfig()  # what single files get
    for name, variant in (("z_image_bf16.safetensors", "base"), ("z_image-Q8_0.gguf", "base"),
                          ("z_image_turbo_bf16.safetensors", "turbo"), ("z-image-turbo-Q4_K_M.gguf", "turbo"),
                          ("my_finetune.safetensors", "turbo")):
        assert detect_variant(f"/comfy/z_image_turbo/../models/{name}", single, single_file=True) == variant, name
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", variant="base")
    assert pipe.defaults.num_inference_steps == 50 and pipe.defaults.guidance_scale == 4.0
    calls = []
    pipe.progress = False
    pipe("a cat", height=32, width=32, output_type="latent", callback=lambda i, n: calls.append((i, n)))
    assert calls[-1] == (50, 50)
    with pytest.raises(ValueError, match="variant"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", variant="large")


def test_the_variant_sets_the_scheduler_shift_of_single_files_and_of_the_other_variants_folder(tiny_model_dir,
                                                                                                tmp_path):
    """Z-Image Base samples with shift 6 (its scheduler_config.json), Turbo with 3. Single files carry
    no scheduler, and a Base DiT is often run with the Turbo folder's other components: the variant
    (given, or from the DiT file's name) sets the shift, and an explicit schedule is kept."""
    from safetensors.torch import save_file

    from .test_formats import comfy_dit, ldm_vae, prefixed_te

    files = {"transformer": tmp_path / "z_image_bf16.safetensors", "vae": tmp_path / "ae.safetensors",
             "text_encoder": tmp_path / "z_image_turbo" / "qwen_3_4b.safetensors"}
    files["text_encoder"].parent.mkdir()
    for (kind, path), sd in zip(files.items(), (comfy_dit(tiny_model_dir), ldm_vae(tiny_model_dir),
                                                prefixed_te(tiny_model_dir))):
        save_file(sd, str(path))
    common = dict(files, tokenizer=tiny_model_dir / "tokenizer", device="cpu",
                  transformer_config={"axes_dims": [8, 12, 12]})  # RoPE axes cannot be read from shapes
    base = ZImagePipeline.from_single_files(**common)
    assert base.variant == "base" and base.scheduler_config.shift == 6.0  # from the DiT's name alone
    turbo = ZImagePipeline.from_single_files(**common, variant="turbo")
    assert turbo.scheduler_config.shift == 3.0
    own = ZImagePipeline.from_single_files(**common, variant="base", scheduler_config={"shift": 4.5})
    assert own.scheduler_config.shift == 4.5  # a schedule of one's own is not a released one: kept
    folder = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", variant="base")  # a Turbo folder (3.0)
    assert folder.scheduler_config.shift == 6.0
    assert ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu").scheduler_config.shift == 3.0


def test_template_fields_and_settings_apply_and_flags_win(tiny_pipe):
    from zimage_native.prompt.templates import default_registry

    name = next(t.name for t in default_registry().list() if t.system_prompt and t.settings.get("width"))
    t = default_registry().get(name)
    out = tiny_pipe("a cat", template=name, num_inference_steps=1, output_type="latent")
    assert out.info["formatted_prompts"][0].startswith(f"<|im_start|>system\n{t.system_prompt}<|im_end|>")
    assert out.info["width"] == t.settings["width"] and out.images.shape[-1] == t.settings["width"] // 8
    out = tiny_pipe("a cat", template=name, system_prompt="mine", width=32, height=32, num_inference_steps=1,
                    output_type="latent")
    assert "system\nmine<|im_end|>" in out.info["formatted_prompts"][0] and out.images.shape[-1] == 4


def test_prompt_fields_change_the_features(tiny_pipe):
    plain = tiny_pipe.encode_prompt(["a cat"])[0]
    thinking = tiny_pipe.encode_prompt(["a cat"], thinking_content="fur, whiskers")[0]
    assert thinking.shape[0] > plain.shape[0]
    assert tiny_pipe.format_prompts(['say "hi"'], strip_quotes=True)[0].count('"') == 0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1.0 / ((a.float() - b.float()) ** 2).mean())).item()


def test_tiled_apply_is_exact_for_local_maps():
    """Blending is right (no seams, no double counting): a local map gives the untiled result."""
    from zimage_native.tiling import tiled_apply

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 70, 93)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=4) * 2 - 1  # noqa: E731
    assert rel_err(tiled_apply(up, x, 24, 8, 4.0), up(x)) < 1e-6
    down = lambda t: torch.nn.functional.avg_pool2d(t, 8)  # noqa: E731  (the encode direction)
    assert rel_err(tiled_apply(down, x[..., :64, :88], 32, 16, 1 / 8), down(x[..., :64, :88])) < 1e-6
    # A 3x3 conv differs only within one pixel of each tile edge, which the blend hides in the overlap.
    out = tiled_apply(conv, x, 32, 16, 1.0)
    assert out.shape == (2, 5, 70, 93)
    assert rel_err(out, conv(x)) < 0.05


@torch.no_grad()
def test_tiled_vae_decode_and_encode_agree_closely_with_untiled(tiny_pipe):
    """GroupNorm statistics and the mid-block attention see one tile, so this is close, not equal."""
    latents = torch.randn(1, 16, 24, 20, generator=torch.Generator().manual_seed(0))
    pixels = preprocess_image(make_image(160, 192))
    full = tiny_pipe.decode(latents)
    z_full = tiny_pipe.encode_image(pixels, [torch.Generator().manual_seed(1)], torch.float32)
    tiny_pipe.enable_vae_tiling(tile_size=128, overlap=32)
    try:
        tiled = tiny_pipe.decode(latents)
        z_tiled = tiny_pipe.encode_image(pixels, [torch.Generator().manual_seed(1)], torch.float32)
    finally:
        tiny_pipe.disable_vae_tiling()
    assert tiled.shape == full.shape == (1, 3, 192, 160)
    assert psnr(tiled, full) > 30, psnr(tiled, full)
    assert z_tiled.shape == z_full.shape and torch.isfinite(z_tiled).all()
    # One tile covering the whole image is the untiled computation.
    tiny_pipe.enable_vae_tiling(tile_size=192, overlap=32)
    try:
        assert rel_err(tiny_pipe.encode_image(pixels, [torch.Generator().manual_seed(1)], torch.float32), z_full) < 1e-6
        assert rel_err(tiny_pipe.decode(latents), full) < 1e-6
    finally:
        tiny_pipe.disable_vae_tiling()


@torch.no_grad()
def test_an_image_encodes_alike_at_any_thread_count(tiny_pipe):
    """Pixels from a PIL image are an NHWC array seen as (B, 3, H, W): channels_last strides. On
    those, torch's CPU GroupNorm (H*W >= 1024) sums each thread's share of the pixels and of their
    squares, so the encoded image (the control latents of a ControlNet request, the img2img start)
    moved with torch.get_num_threads(); the VAE now gets contiguous pixels, as diffusers' ControlNet
    pipelines give it, on any thread count."""
    pixels = preprocess_image(make_image(64, 64), 64, 64)
    assert pixels.is_contiguous(memory_format=torch.channels_last)  # the layout this is about
    threads = torch.get_num_threads()
    got = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = tiny_pipe.encode_image(pixels, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[1], got[2]), rel_err(got[1], got[2])
    assert torch.equal(got[1], tiny_pipe.encode_image(pixels.contiguous(), None))


@torch.no_grad()
def test_channels_last_latents_decode_alike_at_any_thread_count(tiny_pipe):
    """Latents a caller hands over in channels_last (``latents=``: the step loop keeps their layout)
    reached the decoder's GroupNorms channels_last, whose CPU kernel sums each thread's share: the
    images moved with torch.get_num_threads() (here 1 vs 2 threads: rel 5.4e-7, not bit-equal). The
    VAE gets contiguous latents, plain or tiled, as it gets pixels."""
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    channels_last = latents.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        for tile in (None, 64):
            if tile:
                tiny_pipe.enable_vae_tiling(tile_size=tile, overlap=16)
            got = {}
            for n in (1, 2):
                torch.set_num_threads(n)
                got[n] = tiny_pipe.decode(channels_last)
            assert torch.equal(got[1], got[2]), (tile, rel_err(got[1], got[2]))
            assert torch.equal(got[2], tiny_pipe.decode(latents)), tile
    finally:
        torch.set_num_threads(threads)
        tiny_pipe.disable_vae_tiling()


def test_tile_config_rejects_bad_sizes(tiny_pipe):
    with pytest.raises(ValueError, match="overlap"):
        tiny_pipe.enable_vae_tiling(tile_size=128, overlap=64)
    with pytest.raises(ValueError, match="tile_size"):
        tiny_pipe.enable_vae_tiling(tile_size=100)


def test_model_offload_visits_each_component_only_while_it_runs(tiny_model_dir, tiny_pipe, monkeypatch):
    """Without a GPU the visits are recorded: the components run on "cpu:1" (torch's CPU under
    another name, standing in for the GPU) and the storage copies are CPU clones. Each component is
    copied in once per run, in order, every storage once (the fused q|k|v views of one buffer too),
    and nothing is copied back: afterwards every weight is its resting tensor again, and the image
    is the resident pipeline's."""
    import zimage_native.offload as offload
    from zimage_native.accel import fuse_projections_

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", offload="model")
    pipe.progress = False
    pipe.placement = dict.fromkeys(pipe.placement, torch.device("cpu", 1))
    fuse_projections_(pipe.transformer)  # q|k|v and w1|w3 as views of one buffer each
    modules = {"text_encoder": pipe.text_encoder.model, "transformer": pipe.transformer, "vae": pipe.vae}
    owner = {t.untyped_storage().data_ptr(): name for name, m in modules.items()
             for t in (*m.parameters(), *m.buffers())}
    copies = []
    monkeypatch.setattr(offload, "copy_storage",
                        lambda storage, device: copies.append((owner[storage.data_ptr()], storage.nbytes()))
                        or storage.clone())
    resting = {name: [t.data.data_ptr() for t in (*m.parameters(), *m.buffers())] for name, m in modules.items()}
    kw = dict(height=32, width=32, num_inference_steps=1, seed=2, output_type="pt")
    out = pipe("a cat", **kw).images
    visited = [name for i, (name, _) in enumerate(copies) if i == 0 or copies[i - 1][0] != name]
    assert visited == ["text_encoder", "transformer", "vae"]
    for name, m in modules.items():
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*m.parameters(),
                                                                                          *m.buffers())}
        assert sum(n for who, n in copies if who == name) == sum(storages.values()), name  # each storage once
        assert [t.data.data_ptr() for t in (*m.parameters(), *m.buffers())] == resting[name]  # no copy back
    assert_rel(out, tiny_pipe("a cat", **kw).images, 1e-5)  # (its q|k|v GEMMs fused: not bit-equal)
    copies.clear()
    pipe.offload = "text_encoder"
    pipe("a dog", **kw)  # a new prompt: "a cat" is in the prompt cache and would not visit
    assert {name for name, _ in copies} == {"text_encoder"}


def test_offload_and_placement_arguments_are_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="offload"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", offload="sometimes")
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", vae_device="cpu", offload="text_encoder")
    assert pipe.placement["vae"] == torch.device("cpu")


def test_a_bad_size_with_an_input_image_names_the_argument(tiny_pipe):
    """width / height given with an input image are checked as without one (no PIL TypeError)."""
    for kw, name in ((dict(width=100), "width"), (dict(height=48.0), "height"), (dict(width=0), "width")):
        with pytest.raises(ValueError, match=f"{name} must be a positive multiple of 16, got"):
            tiny_pipe.img2img("a cat", make_image(), num_inference_steps=1, **kw)
    with pytest.raises(ValueError, match="the input image must be at least 16x16"):
        tiny_pipe.img2img("a cat", make_image(12, 40), num_inference_steps=1)


def test_diffusers_habits_torch_dtype_to_offload_and_progress(tiny_model_dir):
    """What diffusers users type: from_pretrained(torch_dtype=), pipe.to(device),
    enable_model_cpu_offload(), set_progress_bar_config(disable=True). (meta stands for the GPU.)"""
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not both"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="torch.float64 is not supported"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.progress is False
    pipe.enable_model_cpu_offload(device="meta")
    assert pipe.offload == "model" and set(pipe.placement.values()) == {torch.device("meta")}
    assert pipe.transformer.x_pad_token.device.type == "cpu"  # stored in CPU memory between uses
    meta = torch.device("meta")
    assert pipe.to(meta) is pipe and pipe.offload == "none" and set(pipe.placement.values()) == {meta}
    assert pipe.transformer.x_pad_token.device == meta and pipe.vae.decoder.conv_in.weight.device == meta
    assert next(pipe.text_encoder.model.parameters()).device == meta
    streamed = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", offload="blocks")
    with pytest.raises(ValueError, match="streamed"):
        streamed.to("cpu")


def test_model_offload_keeps_the_gpu_index_of_device(fresh_pipe, monkeypatch):
    """diffusers' enable_model_cpu_offload(device="cuda:1") offloads to GPU 1; here the index was
    dropped (the components visited "cuda", the current GPU). (meta stands for the GPU.)"""
    import zimage_native.pipeline as pipeline

    asked = []
    monkeypatch.setattr(pipeline, "resolve_device", lambda d: asked.append(d) or torch.device("meta"))
    fresh_pipe.enable_model_cpu_offload(device="cuda:1")
    fresh_pipe.enable_model_cpu_offload(gpu_id=2)
    fresh_pipe.enable_model_cpu_offload(gpu_id=1, device="cuda:1")
    fresh_pipe.enable_model_cpu_offload()
    assert asked == ["cuda:1", "cuda:2", "cuda:1", "cuda"]
    with pytest.raises(ValueError, match=r"gpu_id=0, device='cuda:1'\): two GPUs"):
        fresh_pipe.enable_model_cpu_offload(gpu_id=0, device="cuda:1")


def test_to_and_model_offload_give_the_same_image(tiny_pipe, tiny_model_dir):
    kw = dict(height=32, width=32, num_inference_steps=2, seed=3, output_type="latent")
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    offloaded = pipe("a cat", **kw).images
    assert torch.equal(pipe.to("cpu")("a cat", **kw).images, offloaded)
    assert torch.equal(tiny_pipe("a cat", **kw).images, offloaded)


def test_a_placement_change_keeps_fused_views_so_later_weight_edits_reach_the_fused_gemm(tiny_model_dir, monkeypatch):
    """pipe.to() copies storages, not tensors (offload.move_): after a move the q|k|v weights are still
    views of the fused GEMM's weight, so an in-place edit of one (what a fused LoRA does) changes the
    fused GEMM, and their memory is not doubled. ("cpu:1" stands in for a GPU; the copies are CPU clones.)"""
    import zimage_native.offload as offload
    from zimage_native.accel import fuse_projections_

    monkeypatch.setattr(offload, "copy_storage", lambda storage, device: storage.clone())
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu")
    fuse_projections_(pipe.transformer)
    attn = pipe.transformer.layers[0].attention
    before = attn.to_qkv.weight.untyped_storage().data_ptr()
    assert pipe.to(torch.device("cpu", 1)) is pipe
    fused = attn.to_qkv.weight
    assert fused.untyped_storage().data_ptr() != before  # moved
    for w in (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight):
        assert w.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    with torch.no_grad():
        attn.to_k.weight.add_(1.0)
    n = attn.to_q.weight.shape[0]
    assert torch.equal(fused[n:2 * n], attn.to_k.weight)


@pytest.mark.parametrize("shape, prompts, extra", [
    pytest.param((1, 16, 16, 32), "a cat", {}, id="one latent"),
    pytest.param((1, 16, 16, 16), "a cat", {"num_images_per_prompt": 2}, id="one latent, two outputs"),
    pytest.param((2, 16, 16, 16), ["a cat", "a dog"], {"generators": 2}, id="one latent per prompt, generator list"),
    pytest.param((1, 16, 16, 16), "a cat", {"guidance_scale": 3.0, "negative_prompt": "blurry"}, id="with CFG"),
])
def test_img2img_takes_image_latents_as_diffusers_does(tiny_pipe, reference_img2img, shape, prompts, extra):
    """image= of the VAE's latent channels is the clean (scaled) image latents, not encoded, as in
    diffusers' img2img; there it needs width/height (8x the latent sides, multiples of 16) given, and
    without them it fails resizing the latents as an image, while here they are the latents' size."""
    extra = dict(extra)
    n_gens = extra.pop("generators", 0)
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(3, 3 + n_gens)] if n_gens else \
        torch.Generator().manual_seed(3)  # noqa: E731
    latents = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    height, width = shape[2] * 8, shape[3] * 8
    text = lambda: list(prompts) if isinstance(prompts, list) else prompts  # noqa: E731 (diffusers edits a list)
    kw = dict(strength=0.6, num_inference_steps=5, output_type="latent", **extra)
    expected = reference_img2img(text(), image=latents, generator=gens(), height=height, width=width,
                                 **{"guidance_scale": 0.0, **kw}).images
    got = tiny_pipe.img2img(text(), image=latents, generator=gens(), **kw).images
    assert got.shape == expected.shape
    assert_rel(got, expected, 1e-5, "img2img from image latents")


def test_image_latents_are_not_resized_or_inpainted(tiny_pipe):
    latents = torch.randn(1, 16, 8, 12)
    with pytest.raises(ValueError, match=r"make a 96x64 image and are not resized; got width=128"):
        tiny_pipe.img2img("a cat", image=latents, width=128, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"positive multiples of 2 \(the DiT's patch size\), got 12x7"):
        tiny_pipe.img2img("a cat", image=latents[..., :7, :], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"must be a float tensor, got torch.int64"):
        tiny_pipe.img2img("a cat", image=latents.long(), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"inpainting takes an image, not image latents"):
        tiny_pipe.inpaint("a cat", image=latents, mask_image=Image.new("L", (96, 64), 255), num_inference_steps=2)
