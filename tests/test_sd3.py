"""SD 3 (flow matching) in the one sampler, on tiny random-weight SD 3 folders in the hub layout (conftest.py): parity
with StableDiffusion3Pipeline and its own FlowMatchEulerDiscreteScheduler, with T5 and without it; the grad window
(gradients reach exactly the trainable LoRA weights, and the steps before the window keep no graph); LoRA files that a
stock pipeline loads and that reproduce sample.py --lora; RID's teacher on the velocity; the flow sampler refusing eta;
a full train_rid.py run that resumes bit for bit after SIGKILL (test_train.py)."""
import os

import pytest
import torch
from PIL import Image

import losses
import sample
from common import UserError
from conftest import ROOT, assert_loaded_whole
from test_sample import PROMPTS, saved_bytes


def reference_sd3(folder, t5=True):
    from diffusers import StableDiffusion3Pipeline
    ref = StableDiffusion3Pipeline.from_pretrained(folder, **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("t5", [True, False])
def test_sampler_matches_the_stable_diffusion_3_pipeline(t5, tiny_sd3, tiny_sd3_no_t5):
    """The same prompts, seed, steps and guidance (the pipeline's own defaults are 28 and 7.0; fewer steps here):
    the same images to 1e-5, whether T5 encodes the prompt or zeros stand in its place. "!" in a prompt too."""
    folder = tiny_sd3 if t5 else tiny_sd3_no_t5
    pipe = sample.load_pipeline(folder)
    assert pipe.family == "sd3" and pipe.flow and (pipe.text_encoder_3 is not None) == t5
    assert sample.DEFAULTS["sd3"] == (28, 7.0)
    prompts = ["a red circle on a blue background", "wow!!! a green square"]
    g = torch.Generator().manual_seed(3)
    ours = sample.generate(pipe, prompts, sample.initial_latents(pipe, 2, g), 6, 7.0, progress=False)
    ref = reference_sd3(folder, t5)(prompts, num_inference_steps=6, guidance_scale=7.0,
                                    generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert ours.shape == (2, 3, 32, 32) and ours.std() > 0.05
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    cond = sample.encode_prompts(pipe, prompts)
    assert cond["encoder_hidden_states"].shape == (2, 16 + 256, 64) and cond["pooled_projections"].shape == (2, 64)
    assert t5 or not cond["encoder_hidden_states"][:, 16:].any()  # without T5: zeros in its 256 places


def lora_sd3(folder, rank=4, alpha=8.0):
    """The tiny SD 3 pipe with one trainable adapter on the transformer's attention projections, B random."""
    pipe = sample.load_pipeline(folder)
    sample.add_lora(pipe.denoiser, "task0", rank, alpha)
    sample.set_adapters(pipe.denoiser, ["task0"], trainable="task0")
    torch.manual_seed(0)
    with torch.no_grad():
        for k, p in sample.lora_params(pipe.denoiser, "task0").items():
            if "lora_B" in k:
                p.normal_(0, 0.3)
    return pipe


def test_the_grad_window_reaches_exactly_the_lora_weights(tiny_sd3):
    """K = 1 of 4 Euler steps: finite gradients for every trainable LoRA weight (on the image and the text stream's
    projections) and none elsewhere, non-zero except on the last block's text queries (that block's text outputs are
    discarded, so they reach no pixel); the steps before the window keep no graph (the bytes autograd saves do not
    grow with the number of steps), and a second window step does keep more."""
    pipe = lora_sd3(tiny_sd3)
    trainable = sample.lora_params(pipe.denoiser, "task0")
    assert any(".add_q_proj." in k for k in trainable) and any(".to_q." in k for k in trainable)
    cond, uncond = sample.encode_prompts(pipe, PROMPTS[:2]), sample.encode_uncond(pipe, 2)
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(0))
    images, _ = sample.sample(pipe, cond, uncond, latents, 4, 7.0, grad_steps=1)
    (images * torch.linspace(0, 1, 32)).mean().backward()
    grads = {k: p.grad for k, p in pipe.denoiser.named_parameters() if p.grad is not None}
    assert set(grads) == set(trainable) and all(torch.isfinite(g).all() for g in grads.values())
    last = f"transformer_blocks.{pipe.denoiser.config.num_layers - 1}.attn.add_q_proj."
    assert all((g.abs().sum() > 0) != k.startswith(last) for k, g in grads.items())
    assert saved_bytes(pipe, 4, 1) == saved_bytes(pipe, 9, 1) > 0
    assert saved_bytes(pipe, 9, 2) > saved_bytes(pipe, 9, 1)


def test_teacher_loss_on_the_velocity(tiny_sd3):
    """RID on SD 3 matches the velocity the transformer predicts: the loss equals the squared error of the raw outputs,
    student against the EMA weights copied in, at the detached x_t."""
    pipe = lora_sd3(tiny_sd3)
    params = sample.lora_params(pipe.denoiser, "task0")
    g = torch.Generator().manual_seed(2)
    ema = {k: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for k, p in params.items()}
    cond, uncond = sample.encode_prompts(pipe, PROMPTS[:2]), sample.encode_uncond(pipe, 2)
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(1))
    _, captured = sample.sample(pipe, cond, uncond, latents, 4, 7.0, grad_steps=1, capture={1, 3})
    context = sample.cat_context(uncond, cond)
    loss = losses.teacher_loss(pipe, captured, context, ema)
    with torch.no_grad():
        student = [sample.denoise(pipe.denoiser, torch.cat([x, x]), t, context) for t, x, _ in captured.values()]
        saved = {k: p.detach().clone() for k, p in params.items()}
        for k, p in params.items():
            p.copy_(ema[k])
        teacher = [sample.denoise(pipe.denoiser, torch.cat([x, x]), t, context) for t, x, _ in captured.values()]
        for k, p in params.items():
            p.copy_(saved[k])
    direct = torch.stack([(s - t).pow(2).mean() for s, t in zip(student, teacher)]).mean()
    assert direct > 0
    torch.testing.assert_close(loss.detach(), direct, rtol=1e-5, atol=0)


def test_an_adapter_that_loads_in_part_is_refused_in_one_line(tiny_sd3, tmp_path):
    """An SD 3 adapter saved with the UNet families' key conversion (convert_state_dict_to_diffusers renames to_q/k/v/out
    to the old lora.down/up names and leaves the add_* keys in peft's) loads only in part: the SD 3 loader drops the
    renamed keys with a warning. sample.load_lora counts what became a weight and refuses such a file in one line."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    pipe = lora_sd3(tiny_sd3, rank=4, alpha=12.0)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.denoiser, adapter_name="task0"))
    diffusers.StableDiffusion3Pipeline.save_lora_weights(str(tmp_path / "old"), transformer_lora_layers=state)
    fresh = sample.load_pipeline(tiny_sd3)
    with pytest.raises(UserError, match=r"holds 30 LoRA tensors for this model's denoiser, of which 14 match it"):
        sample.load_lora(fresh, str(tmp_path / "old"), "old")
    sample.save_lora(pipe, "task0", str(tmp_path / "new"))  # rid's own file: whole
    sample.load_lora(fresh, str(tmp_path / "new"), "new")
    assert_loaded_whole(str(tmp_path / "new"), fresh.denoiser, "new")


def test_the_flow_sampler_refuses_eta(tiny_sd3):
    pipe = sample.load_pipeline(tiny_sd3)
    with pytest.raises(UserError, match="--eta"):
        sample.check_eta(pipe.family, 0.5)
    sample.check_eta(pipe.family, 0.0)
    assert not os.path.exists(os.path.join(ROOT, "out"))  # nothing written by the check


def test_default_size_and_a_non_square_size(tiny_sd3):
    pipe = sample.load_pipeline(tiny_sd3)
    assert pipe.size == (32, 32)
    latents = sample.initial_latents(pipe, 1, torch.Generator().manual_seed(0), 24, 40)
    images = sample.generate(pipe, PROMPTS[:1], latents, 2, progress=False)
    assert latents.shape == (1, 16, 12, 20) and images.shape == (1, 3, 24, 40)
    Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))  # a valid picture


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_prompts_encoded_once_give_the_same_images_without_the_text_encoders(family, tiny_sd3, tiny_sdxl):
    """--cache_prompts: every prompt and "" encoded once (each alone), then the text encoders are dropped; sampling
    reads the cache and gives the images the encoders give (SDXL: with its time ids, which depend on the size), up to
    the float rounding of encoding one prompt at a time instead of a batch (6e-5 here, far below 1/255)."""
    folder = tiny_sd3 if family == "sd3" else tiny_sdxl
    pipe = sample.load_pipeline(folder)
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(5))
    direct = sample.generate(pipe, PROMPTS[:2], latents, 4, 6.0, progress=False)
    sample.cache_prompts(pipe, PROMPTS[:2], (32, 32))
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None
    assert sorted(p for p, _ in pipe.prompt_cache) == sorted(["", *PROMPTS[:2]])
    assert all(t.device.type == "cpu" for c in pipe.prompt_cache.values() for t in c.values() if torch.is_tensor(t))
    cached = sample.generate(pipe, PROMPTS[:2], latents, 4, 6.0, progress=False)
    torch.testing.assert_close(cached, direct, rtol=0, atol=2e-4)
    with pytest.raises(UserError, match="was not encoded by cache_prompts"):
        sample.encode_prompts(pipe, [PROMPTS[2]], (32, 32))
