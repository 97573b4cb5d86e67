"""Seed variance: seeded noise on the prompt features of the first steps (Turbo's seed diversity)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zimage_native.accel.cuda_graphs import GraphedSampler
from zimage_native.sampling import VARIANCE_SEED_OFFSET, GenerationRequest
from zimage_native.scheduler import make_schedule

from .graph_standins import FrozenGraphs
from .utils import assert_rel, rel_err

KW = dict(height=32, width=32, num_inference_steps=4, output_type="latent")
VAR = dict(seed_variance=20.0, seed_variance_share=0.5, seed_variance_steps=0.5)


def varied_by_hand(features: torch.Tensor, seed: int, amount: float, share: float) -> torch.Tensor:
    """The slow twin of sampling.vary for one image: its own arithmetic, in float64."""
    g = torch.Generator().manual_seed((seed + VARIANCE_SEED_OFFSET) % 2**64)
    keep = torch.rand(features.shape, generator=g).double().lt(share).double()
    u = torch.rand(features.shape, generator=g).double()
    return (features.double() + keep * (u * 2.0 - 1.0) * amount).to(features.dtype)


def run_by_hand(pipe, prompt: str, seed: int, steps: int, switch: int) -> torch.Tensor:
    """The first ``switch`` steps with the varied features, then the rest with the prompt's own:
    two plans of the unchanged core, the steps taken from one, then the other."""
    clean = pipe.encode_prompt([prompt])
    noisy = [varied_by_hand(clean[0], seed, VAR["seed_variance"], VAR["seed_variance_share"])]
    schedule = make_schedule(pipe.scheduler_config, steps)
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(seed))
    first = pipe.plan(latents.shape[-2:], noisy, None, schedule)
    rest = pipe.plan(latents.shape[-2:], clean, None, schedule)
    x = pipe.run_steps(latents, type(first)(**{**first.__dict__, "steps": first.steps[:switch]}))
    return pipe.run_steps(x, type(rest)(**{**rest.__dict__, "steps": rest.steps[switch:]}))


@pytest.fixture
def pipe(fresh_pipe):
    return fresh_pipe


def test_the_first_steps_see_the_varied_features_and_the_rest_the_prompt(pipe):
    got = pipe("a cat", seed=7, **VAR, **KW).images
    want = run_by_hand(pipe, "a cat", 7, steps=4, switch=2)  # 0.5 of 4 steps
    assert_rel(got, want, 1e-6)
    plain = pipe("a cat", seed=7, **KW).images
    assert rel_err(got, plain) > 1e-3  # it changed the image
    # 0.2 of 4 steps is step 0 only (step k is varied while k < 0.2 * 4)
    one = pipe("a cat", seed=7, **{**VAR, "seed_variance_steps": 0.2}, **KW).images
    assert_rel(one, run_by_hand(pipe, "a cat", 7, steps=4, switch=1), 1e-6)


def test_with_every_step_varied_it_is_the_run_with_the_varied_features_given(pipe):
    kw = dict(seed=9, guidance_scale=2.0, negative_prompt="blurry", **KW)  # the negatives stay as they are
    got = pipe("a cat", **{**VAR, "seed_variance_steps": 1.0}, **kw).images
    clean, negative = pipe.encode_prompt(["a cat"]), pipe.encode_prompt(["blurry"])
    varied = [varied_by_hand(clean[0], 9, VAR["seed_variance"], VAR["seed_variance_share"])]
    assert_rel(got, pipe(prompt_embeds=varied, negative_prompt_embeds=negative, **kw).images, 1e-6)


def test_a_seed_reproduces_its_image_alone_or_in_a_batch_and_seeds_differ(pipe):
    batch = pipe("a cat", seed=[3, 4], num_images_per_prompt=2, **VAR, **KW).images
    alone = pipe("a cat", seed=4, **VAR, **KW).images
    assert_rel(batch[1:], alone, 1e-5)
    assert_rel(pipe("a cat", seed=4, **VAR, **KW).images, alone, 0.0)
    # the variation itself depends on the seed: the difference it makes differs between seeds
    plain = pipe("a cat", seed=[3, 4], num_images_per_prompt=2, **KW).images
    d3, d4 = batch[0] - plain[0], batch[1] - plain[1]
    assert rel_err(d3, d4) > 0.1
    # a generator stands for its seed
    by_generator = pipe("a cat", generator=torch.Generator().manual_seed(4), **VAR, **KW).images
    assert_rel(by_generator, alone, 1e-6)


def test_img2img_starting_after_the_varied_steps_says_it_has_no_effect(pipe, caplog):
    from PIL import Image

    image = Image.new("RGB", (32, 32), (120, 80, 40))
    kw = dict(image=image, strength=0.5, seed=2, **KW)  # 4 steps: starts at step 2
    plain = pipe("a cat", **kw).images
    with caplog.at_level("WARNING", logger="zimage_native.sampling"):
        same = pipe("a cat", **VAR, **kw).images  # varied: steps 0 and 1, both skipped
    assert torch.equal(same, plain)
    assert "seed_variance has no effect here: the run starts at step 2 of 4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="zimage_native.sampling"):
        changed = pipe("a cat", **{**VAR, "seed_variance_steps": 0.75}, **kw).images  # steps 0 to 2
    assert "no effect" not in caplog.text and rel_err(changed, plain) > 1e-3


def test_off_is_the_plain_run_and_bad_values_are_refused(pipe):
    assert torch.equal(pipe("a cat", seed=1, seed_variance=0.0, **KW).images, pipe("a cat", seed=1, **KW).images)
    for kwargs, message in (({"seed_variance": -1.0}, "seed_variance must be >= 0"),
                            ({"seed_variance": math.nan}, "seed_variance must be a finite number"),
                            ({"seed_variance": 5.0, "seed_variance_share": 0.0}, "seed_variance_share"),
                            ({"seed_variance": 5.0, "seed_variance_steps": 1.5}, "seed_variance_steps")):
        with pytest.raises(ValueError, match=message):
            pipe("a cat", seed=1, **kwargs, **KW)
    # numpy's float32 is a number too (it was refused as "must be a finite number")
    as_numpy = {k: np.float32(v) for k, v in VAR.items()}
    assert torch.equal(pipe("a cat", seed=1, **as_numpy, **KW).images, pipe("a cat", seed=1, **VAR, **KW).images)


def test_share_and_steps_default_with_seed_variance_on_and_are_refused_without_it(pipe):
    """Unset, the share and steps are 0.5 and 0.2 while seed variance is on; given without it, where they
    would change nothing, they are refused (as a ControlNet scale without a control image)."""
    on = pipe("a cat", seed=1, seed_variance=20.0, **KW)
    spelled = pipe("a cat", seed=1, seed_variance=20.0, seed_variance_share=0.5, seed_variance_steps=0.2, **KW)
    assert torch.equal(on.images, spelled.images)
    assert (on.info["seed_variance_share"], on.info["seed_variance_steps"]) == (0.5, 0.2)
    for kwargs in ({"seed_variance_share": 0.9}, {"seed_variance_steps": 1.0},
                   {"seed_variance": 0.0, "seed_variance_share": 0.5}):
        name = next(k for k in kwargs if k != "seed_variance")
        with pytest.raises(ValueError, match=rf"{name} .* needs seed_variance > 0 \(seed variance is off"):
            pipe("a cat", seed=1, **kwargs, **KW)


@pytest.mark.parametrize("mode", ["step", "loop"])
def test_graph_replay_equals_eager_with_one_graph_for_both_kinds_of_step(pipe, tiny_pipe, mode):
    frozen = FrozenGraphs()
    pipe._graphed = GraphedSampler(pipe, capture=frozen.capture, new_event=frozen.event, mode=mode)
    for seed in (1, 2):  # the varied tokens are copied in per request, and at the switch
        got = pipe("a cat", seed=seed, **VAR, **KW).images
        assert_rel(got, tiny_pipe("a cat", seed=seed, **VAR, **KW).images, 1e-5, f"seed {seed}")
    assert pipe._graphed.captures == 1


def test_the_request_and_the_image_record_carry_it(pipe):
    out = pipe("a cat", seed=1, **VAR, **KW)
    assert {k: out.info[k] for k in VAR} == VAR
    assert "seed_variance" not in pipe("a cat", seed=1, **KW).info
    params = GenerationRequest(prompt="a cat", **VAR).params()
    assert {k: params[k] for k in VAR} == VAR and "seed_variance" not in GenerationRequest(prompt="a").params()
