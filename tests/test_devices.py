"""The meta device stands in for a GPU: every network goes to `meta` and the code runs unchanged, so a
tensor that the sampler, the losses or a reward makes on the CPU meets meta weights and fails, as it would fail on
CUDA. Covered for every family on the tiny layouts (SD 1.x eps, SD 2.x v-prediction, SDXL, SD 3 with and without T5,
FLUX.1 dev-like and schnell-like):
one whole training step of RID with K = 2 (the grad window, the decode and a reward, the teacher loss, backward, the
optimiser step and the EMA update) and one evaluation batch up to its images. Each real reward's forward and backward
on meta is in test_rewards.py. Nothing is computed on meta, only shapes and devices: these tests are about placement."""
import pytest
import torch

import losses
import rewards
import sample
from test_sample import variant

PROMPTS = ["a red circle on a blue background", "a green square"]


@pytest.fixture
def folders(tiny_sd, tiny_sdxl, tiny_sd3, tiny_sd3_no_t5, tiny_flux, tiny_flux_schnell, tmp_path):
    return {"sd1-eps": tiny_sd, "sd2-v": lambda: variant(tiny_sd, tmp_path, scheduler={"prediction_type": "v_prediction"}),
            "sdxl": tiny_sdxl, "sd3": tiny_sd3, "sd3-no-t5": tiny_sd3_no_t5, "flux-dev": tiny_flux,
            "flux-schnell": tiny_flux_schnell}


@pytest.mark.parametrize("family", ["sd1-eps", "sd2-v", "sdxl", "sd3", "sd3-no-t5", "flux-dev", "flux-schnell"])
def test_a_rid_step_and_an_evaluation_batch_run_with_every_network_on_meta(family, folders):
    folder = folders[family]() if callable(folders[family]) else folders[family]
    pipe = sample.load_pipeline(folder, device="meta")  # denoiser, VAE and text encoders: the real loader, on meta
    reward = rewards.load_reward("toypref", device="meta")  # a CLIP image tower with the aesthetic head
    assert {p.device.type for net in (pipe.denoiser, pipe.vae, pipe.text_encoder, reward) for p in net.parameters()} \
        == {"meta"}
    for name in ("task1", "task2"):  # task 2 of a run: the first adapter frozen, the second trained
        sample.add_lora(pipe.denoiser, name)
    sample.set_adapters(pipe.denoiser, ["task1", "task2"], trainable="task2")
    params = sample.lora_params(pipe.denoiser, "task2")
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    ema = {k: p.detach().clone() for k, p in params.items()}
    # the latents are drawn on the CPU, as training and evaluation draw them, then moved as they move them
    size = (32, 32)  # the tiny layouts' (FLUX.1's default would be 128 latent pixels)
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(0), *size).to("meta")
    r, loss_rid = losses.step_losses(pipe, reward, PROMPTS, latents, ddim_steps=3, guidance_scale=7.5, grad_steps=2,
                                     teacher=ema)
    assert r.shape == (2,) and r.device.type == loss_rid.device.type == "meta"
    (-r.mean() + 3.0 * loss_rid).backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in params.values())
    torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
    optimizer.step()
    losses.ema_update(ema, params, 0.99)
    assert all(v.device.type == "meta" for v in ema.values())
    with torch.no_grad():  # an evaluation batch, as sample.generate samples it, and its scores
        images, _ = sample.sample(pipe, sample.encode_prompts(pipe, PROMPTS, size),
                                  sample.encode_uncond(pipe, 2, size), latents, 3, 7.5)
        scores = reward(images, PROMPTS)
    assert images.shape == (2, 3, *size) and images.device.type == "meta" and scores.shape == (2,)


def test_a_grid_left_on_the_cpu_fails_on_meta(tiny_sd):
    """The guard itself: the unfixed sampler (set_timesteps without a device) fails here, as on CUDA."""
    pipe = sample.load_pipeline(tiny_sd, device="meta")
    pipe.scheduler.set_timesteps(3)
    context = sample.encode_prompts(pipe, PROMPTS[:1])
    with pytest.raises(RuntimeError, match="device"):
        sample.denoise(pipe.denoiser, torch.zeros(1, 4, 16, 16, device="meta"), pipe.scheduler.timesteps[0], context)
