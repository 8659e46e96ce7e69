"""FLUX.1 in the one sampler, on tiny random-weight FLUX folders in the hub layout (conftest.py): a dev-like layout
(the guidance scale an input of the transformer, T5 at 512 tokens) and a schnell-like one (no guidance input, 256
tokens). Parity with FluxPipeline (its sigma grid with the dynamic shift, 2 x 2 packed latents and their position
ids, the time given as sigma); the grad window reaching exactly the LoRA weights; the teacher on the velocity of the
one branch. The run's adapter in a stock FluxPipeline and the SIGKILL resume are in test_train.py, the meta device in
test_devices.py, the stock pipeline in test_sample.py."""
import os

import numpy as np
import pytest
import torch

import losses
import sample
from test_sample import read_pngs, run_sample_cli

PROMPTS = ["a red circle on a blue background", "wow!!! a green square"]


def reference_flux(folder):
    from diffusers import FluxPipeline
    ref = FluxPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("dev", [True, False])
def test_sampler_matches_the_flux_pipeline(dev, tiny_flux, tiny_flux_schnell):
    """The same prompts, seed, steps and guidance (FluxPipeline's defaults are 28 steps and guidance 3.5; fewer steps
    here): the same images to 1e-5, dev-like and schnell-like, at 32 px and at a non-square 24 x 40."""
    folder = tiny_flux if dev else tiny_flux_schnell
    pipe = sample.load_pipeline(folder)
    assert pipe.family == "flux" and pipe.flow and sample.DEFAULTS["flux"] == (28, 3.5)
    assert sample.flux_text_length(pipe) == (512 if dev else 256) and sample.encode_uncond(pipe, 2) is None
    for h, w in ((32, 32), (24, 40)):
        g = torch.Generator().manual_seed(3)
        ours = sample.generate(pipe, PROMPTS, sample.initial_latents(pipe, 2, g, h, w), 5, 3.5, progress=False)
        ref = reference_flux(folder)(PROMPTS, height=h, width=w, num_inference_steps=5, guidance_scale=3.5,
                                     max_sequence_length=sample.flux_text_length(pipe),
                                     generator=torch.Generator().manual_seed(3), output_type="pt").images
        assert ours.shape == (2, 3, h, w) and ours.std() > 0.05
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_cli_matches_the_flux_pipeline_to_one_level(tiny_flux, tmp_path):
    r = run_sample_cli("--model", tiny_flux, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "5",
                       "--ddim_steps", "4", "--height", "32", "--width", "32", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    ours = read_pngs(tmp_path / "out", 2)
    ref = reference_flux(tiny_flux)(PROMPTS, height=32, width=32, num_inference_steps=4,
                                    generator=torch.Generator().manual_seed(5)).images  # guidance 3.5, as ours
    assert np.abs(ours - np.stack([np.asarray(im).astype(int) for im in ref])).max() <= 1 and ours.std() > 20


def lora_flux(folder):
    pipe = sample.load_pipeline(folder)
    sample.add_lora(pipe.denoiser, "task0", 4, 8.0, seed=0)
    sample.set_adapters(pipe.denoiser, ["task0"], trainable="task0")
    with torch.no_grad():
        for k, p in sample.lora_params(pipe.denoiser, "task0").items():
            if "lora_B" in k:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return pipe


def test_the_grad_window_reaches_exactly_the_lora_weights(tiny_flux):
    """K = 2 of 4 Euler steps: every LoRA weight of the diffusers FLUX example's targets (joint blocks' attention and
    feed-forward of both streams, single blocks' q, k, v) gets a gradient, nothing else does; without a window, no
    graph at all."""
    pipe = lora_flux(tiny_flux)
    names = {k.split(".lora_")[0] for k in sample.lora_params(pipe.denoiser, "task0")}
    assert any(".ff_context.net.2" in n for n in names) and any(n.startswith("single_transformer_blocks") for n in names)
    cond = sample.encode_prompts(pipe, PROMPTS)
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(0), 32, 32)
    images, _ = sample.sample(pipe, cond, None, latents, 4, 3.5, grad_steps=2)
    (images * torch.linspace(0, 1, 32)).mean().backward()
    got = {k for k, p in pipe.denoiser.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == set(sample.lora_params(pipe.denoiser, "task0"))
    with torch.no_grad():
        images, _ = sample.sample(pipe, cond, None, latents, 4, 3.5, grad_steps=0)
    assert not images.requires_grad


def test_teacher_loss_on_the_velocity_of_the_one_branch(tiny_flux):
    """RID on FLUX.1: no unconditional branch, so the teacher is matched on the velocity of the one call per step
    (with the guidance input), at the K window steps: the loss equals the mean squared difference of the student's and
    the teacher's (EMA weights swapped in) velocities, computed here by hand."""
    pipe = lora_flux(tiny_flux)
    params = sample.lora_params(pipe.denoiser, "task0")
    teacher = {k: p.detach() + 0.05 for k, p in params.items()}
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(2), 32, 32)
    reward = lambda images, prompts: images.mean((1, 2, 3))
    r, loss = losses.step_losses(pipe, reward, PROMPTS, latents, 3, 3.5, grad_steps=1, teacher=teacher)
    cond = sample.encode_prompts(pipe, PROMPTS, (32, 32))
    context = sample.denoiser_context(pipe, cond, None, 3.5, 2)
    assert context["guidance"].tolist() == [3.5, 3.5]
    with torch.no_grad():
        _, captured = sample.sample(pipe, cond, None, latents, 3, 3.5, capture=[2])
        t, x, student = captured[2]
        target = sample.denoise(pipe.denoiser, x, t, context, weights=teacher)
    assert student.shape == x.shape == (2, 4, 16, 16) and loss > 0
    torch.testing.assert_close(loss.detach(), (student - target).pow(2).mean(), rtol=1e-5, atol=0)


def test_flux_sizes_are_multiples_of_the_vae_scale_times_two(tiny_flux):
    """Latents are packed 2 x 2: on the tiny layout (VAE scale 2) sizes are multiples of 4 (16 for FLUX.1)."""
    family, _ = sample.model_index(tiny_flux)
    assert family == "flux"
    sample.check_size(tiny_flux, family, 36, 40)
    with pytest.raises(sample.UserError, match="multiples of 4 px"):
        sample.check_size(tiny_flux, family, 34, None)
    assert os.path.isdir(os.path.join(tiny_flux, "transformer"))
