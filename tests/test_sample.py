"""The core against its references: diffusers' StableDiffusionPipeline and DDIMScheduler, autograd, and
diffusers' own LoRA loader. All on the tiny random-weight SD folder of conftest.py."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import sample
from common import UserError
from conftest import ROOT, assert_loaded_whole

PROMPTS = ["a red circle on a blue background", "a green square", "a photo of a cat"]


def reference_pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    ref = StableDiffusionPipeline.from_pretrained(folder)
    ref.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")  # every key of the file, as ours
    ref.set_progress_bar_config(disable=True)
    return ref


def run_sample_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def read_pngs(folder, n):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{k:03d}.png"))).astype(int) for k in range(n)])


def test_cli_matches_diffusers_pipeline(tiny_sd, tmp_path):
    out = tmp_path / "imgs"
    args = sum([["--prompt", p] for p in PROMPTS], [])
    r = run_sample_cli("--model", tiny_sd, *args, "--seed", "3", "--ddim_steps", "12", "--guidance_scale", "7.5",
                       "--eta", "0", "--out", str(out), "--batch_size", "2")
    assert r.returncode == 0, r.stderr
    ours = read_pngs(out, len(PROMPTS))
    ref = reference_pipeline(tiny_sd)(PROMPTS, num_inference_steps=12, guidance_scale=7.5,
                                      generator=torch.Generator().manual_seed(3)).images
    ref = np.stack([np.asarray(im).astype(int) for im in ref])
    assert ours.shape == ref.shape == (3, 32, 32, 3)  # default size from the model: 16 latent px * vae scale 2
    assert ours.std() > 20, "images must have structure for the comparison to mean anything"
    assert np.abs(ours - ref).max() <= 1
    assert os.path.isfile(out / "grid.png")


SCHEDULERS = {  # the scheduler configurations the sampler must follow as DDIMScheduler does
    "epsilon": {},
    "v_prediction": {"prediction_type": "v_prediction"},  # SD 2.x 768 px
    "v_zero_snr": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    "sample": {"prediction_type": "sample"},
    "clip_sample": {"clip_sample": True, "clip_sample_range": 1.5},
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_scheduler(kind, eta):
    """One step from the raw model output, for every prediction type (zero terminal SNR: alpha = 0 at the first
    step, where an eps -> x_0 route would divide by zero), against DDIMScheduler.step with the same noise."""
    from diffusers import DDIMScheduler
    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
              "steps_offset": 1, "clip_sample": False, **SCHEDULERS[kind]}
    scheduler = DDIMScheduler(**config)
    ts, alphas, alphas_prev = sample.ddim_schedule(scheduler, 20)
    torch.manual_seed(0)
    for i, t in enumerate(ts):
        x, out, noise = torch.randn(3, 2, 4, 4, 4).unbind(0)
        ref = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        x0, eps = sample.predict_x0_eps(out, x, alphas[i], config.get("prediction_type", "epsilon"))
        if config["clip_sample"]:
            x0 = x0.clamp(-1.5, 1.5)
        ours = sample.ddim_step(x0, eps, alphas[i], alphas_prev[i], eta, noise)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if kind == "v_zero_snr":
        assert alphas[0] == 0  # the case that needs x_0 straight from v


def variant(folder, tmp_path, scheduler=None, unet=None, vae=None):
    """A copy of a tiny model folder with some config keys changed (the weights stay the same)."""
    import json
    import shutil
    copy = shutil.copytree(folder, tmp_path / "variant")
    for part, changes in (("scheduler", scheduler), ("unet", unet), ("vae", vae)):
        path = copy / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, **(changes or {})}))
    return str(copy)


@pytest.mark.parametrize("kind", ["v_prediction", "v_zero_snr", "sample", "clip_sample"])
def test_sampler_matches_pipeline_for_every_prediction_type(kind, tiny_sd, tmp_path):
    """The whole sampler against StableDiffusionPipeline + DDIMScheduler built from the same scheduler config."""
    folder = variant(tiny_sd, tmp_path, scheduler=SCHEDULERS[kind])
    pipe = sample.load_pipeline(folder)
    g = torch.Generator().manual_seed(1)
    ours = sample.generate(pipe, PROMPTS[:2], sample.initial_latents(pipe, 2, g), 8, 5.0, progress=False)
    ref = reference_pipeline(folder)(PROMPTS[:2], num_inference_steps=8, guidance_scale=5.0,
                                     generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.isfinite(ours).all() and ours.std() > 0.05
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_load_refuses_what_the_sampler_cannot_follow(tiny_sd, tmp_path):
    """Zero terminal SNR with epsilon prediction has no x_0 at the first step; an unknown prediction type and
    dynamic thresholding are not handled: each is one line (UserError), before any sampling."""
    for i, config in enumerate([{"rescale_betas_zero_snr": True}, {"prediction_type": "flow"}, {"thresholding": True}]):
        with pytest.raises(UserError) as e:
            sample.load_pipeline(variant(tiny_sd, tmp_path / str(i), scheduler=config))
        assert "\n" not in str(e.value)


def test_a_sample_size_given_as_height_and_width(tiny_sd, tmp_path):
    """unet.config.sample_size as [h, w] (non-square models): the default size is (8h... ) per side, not a list."""
    pipe = sample.load_pipeline(variant(tiny_sd, tmp_path, unet={"sample_size": [16, 24]}))
    assert pipe.size == (32, 48)
    latents = sample.initial_latents(pipe, 1, torch.Generator().manual_seed(0))
    assert latents.shape == (1, 4, 16, 24)
    assert sample.generate(pipe, PROMPTS[:1], latents, 2, progress=False).shape == (1, 3, 32, 48)


def lora_pipe(tiny_sd, rank=4, alpha=8.0, seed=0):
    """Tiny pipe with one trainable adapter whose B is random (a fresh adapter has B = 0 and changes nothing)."""
    pipe = sample.load_pipeline(tiny_sd)
    config = sample.add_lora(pipe.denoiser, "task0", rank, alpha)
    sample.set_adapters(pipe.denoiser, ["task0"], trainable="task0")
    torch.manual_seed(seed)
    with torch.no_grad():
        for k, p in sample.lora_params(pipe.denoiser, "task0").items():
            if "lora_B" in k:
                p.normal_(0, 0.3)
    return pipe, config


def grad_of_loss(pipe, grad_steps, checkpointing, steps=6):
    for p in pipe.denoiser.parameters():
        p.grad = None
    cond, uncond = sample.encode_prompts(pipe, PROMPTS[:2]), sample.encode_prompts(pipe, ["", ""])
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(0))
    images, _ = sample.sample(pipe, cond, uncond, latents, steps, 7.5, grad_steps=grad_steps,
                              checkpointing=checkpointing)
    if grad_steps == 0:
        assert not images.requires_grad
        return {}
    (images * torch.linspace(0, 1, 32)).mean().backward()  # any non-trivial function of the pixels
    return {k: p.grad.clone() for k, p in pipe.denoiser.named_parameters() if p.grad is not None}


def test_gradients_reach_only_trainable_lora_weights(tiny_sd):
    pipe, _ = lora_pipe(tiny_sd)
    trainable = sample.lora_params(pipe.denoiser, "task0")
    assert all(p.dtype == torch.float32 for p in trainable.values())
    grads = grad_of_loss(pipe, grad_steps=2, checkpointing=True)
    assert set(grads) == set(trainable), "exactly the trainable LoRA weights get gradients"
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for net in (pipe.vae, pipe.text_encoder) for p in net.parameters())
    assert grad_of_loss(pipe, grad_steps=0, checkpointing=True) == {}
    # After one optimiser step from a fresh adapter (B = 0, so A gets no gradient at first), all are non-zero.
    fresh = sample.load_pipeline(tiny_sd)
    sample.add_lora(fresh.denoiser, "t", 4, 4.0)
    sample.set_adapters(fresh.denoiser, ["t"], trainable="t")
    params = list(sample.lora_params(fresh.denoiser, "t").values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    first = grad_of_loss(fresh, 1, True)
    assert all(first[k].abs().sum() == 0 for k in first if "lora_A" in k)  # B = 0 at the start
    opt.step()
    assert all(g.abs().sum() > 0 for g in grad_of_loss(fresh, 1, True).values())


def test_checkpointing_gives_the_same_gradients(tiny_sd):
    pipe, _ = lora_pipe(tiny_sd)
    with_ckpt, without = grad_of_loss(pipe, 3, True), grad_of_loss(pipe, 3, False)
    assert with_ckpt.keys() == without.keys() and len(with_ckpt) > 0
    for k in with_ckpt:
        torch.testing.assert_close(with_ckpt[k], without[k], rtol=1e-4, atol=1e-7)


def saved_bytes(pipe, steps, grad_steps, checkpointing=True):
    """Bytes autograd keeps for backward during one sampling pass: the sampler's graph memory, counted exactly
    with saved_tensors_hooks (a measurement that does not depend on the machine's load)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    cond, uncond = sample.encode_prompts(pipe, PROMPTS[:2]), sample.encode_prompts(pipe, ["", ""])
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sample.sample(pipe, cond, uncond, latents, steps, 7.5, grad_steps=grad_steps, checkpointing=checkpointing)
    return total


def test_steps_before_the_window_build_no_graph(tiny_sd):
    pipe, _ = lora_pipe(tiny_sd)
    short, long = saved_bytes(pipe, 4, 1), saved_bytes(pipe, 20, 1)
    assert short > 0 and short == long, (short, long)  # 16 more no-grad steps: not one byte more
    assert saved_bytes(pipe, 20, 2) > long  # while each extra window step does keep something
    assert saved_bytes(pipe, 20, 2, checkpointing=False) > saved_bytes(pipe, 20, 2)  # and checkpointing saves it


def test_two_adapters_compose_and_reload(tiny_sd, tmp_path):
    """W0 + A_1 + A_2: two adapters saved and loaded back into a fresh UNet give the same UNet output."""
    pipe, config = lora_pipe(tiny_sd, seed=1)
    sample.add_lora(pipe.denoiser, "task1", 4, 2.0)
    sample.set_adapters(pipe.denoiser, ["task0", "task1"], trainable="task1")
    with torch.no_grad():
        for k, p in sample.lora_params(pipe.denoiser, "task1").items():
            p.normal_(0, 0.2)
    assert {k for k, p in pipe.denoiser.named_parameters() if p.requires_grad} == set(sample.lora_params(pipe.denoiser, "task1"))
    for name in ("task0", "task1"):
        sample.save_lora(pipe, name, str(tmp_path / name))
    fresh = sample.load_pipeline(tiny_sd)
    for name in ("task0", "task1"):
        sample.load_lora(fresh, str(tmp_path / name), name)
        assert_loaded_whole(str(tmp_path / name), fresh.denoiser, name)
    sample.set_adapters(fresh.denoiser, ["task0", "task1"])
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor(500), {"encoder_hidden_states": torch.randn(2, 16, 32)}
    with torch.no_grad():
        torch.testing.assert_close(sample.denoise(fresh.denoiser, x, t, ctx), sample.denoise(pipe.denoiser, x, t, ctx))
        sample.set_adapters(fresh.denoiser, ["task0"])
        assert not torch.allclose(sample.denoise(fresh.denoiser, x, t, ctx), sample.denoise(pipe.denoiser, x, t, ctx))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "not_sd", "hub_offline", "no_prompt", "bad_lora", "not_empty",
                                  "damaged_lora", "negative_seed", "huge_seed"])
def test_cli_bad_input_is_one_line(case, tiny_sd, tmp_path):
    out = tmp_path / "out"
    damaged = tmp_path / "lora"
    damaged.mkdir()
    (damaged / sample.LORA_WEIGHTS).write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    args = {"damaged_lora": ["--model", tiny_sd, "--prompt", "x", "--lora", str(damaged)],
            "negative_seed": ["--model", tiny_sd, "--prompt", "x", "--seed", "-1"],
            "huge_seed": ["--model", tiny_sd, "--prompt", "x", "--seed", str(2**64)],"missing": ["--model", str(tmp_path / "nope"), "--prompt", "x"],
            "not_sd": ["--model", str(tmp_path), "--prompt", "x"],
            "hub_offline": ["--model", "someone/not-downloaded-model", "--prompt", "x"],
            "no_prompt": ["--model", tiny_sd],
            "bad_lora": ["--model", tiny_sd, "--prompt", "x", "--lora", str(tmp_path)],
            "not_empty": ["--model", tiny_sd, "--prompt", "x"]}[case]
    if case == "not_empty":
        out.mkdir()
        (out / "keep.png").write_bytes(b"earlier run")
    before = sorted(os.listdir(tmp_path))
    r = run_sample_cli(*args, "--out", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    if case == "not_empty":
        assert (out / "keep.png").read_bytes() == b"earlier run"
    assert (damaged / sample.LORA_WEIGHTS).read_bytes() == b"\x10\x00\x00\x00not a safetensors file"


def test_a_kill_during_a_write_leaves_the_old_file(tmp_path):
    """atomic_file / atomic_dir (used for checkpoints, adapters, results and images): SIGKILL in the middle of a
    write leaves the earlier file or folder whole, and the next write still succeeds."""
    target, folder = tmp_path / "checkpoint.pt", tmp_path / "adapter"
    torch.save({"step": 1}, target)
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"old")
    script = f"""
import os, signal, torch, common
with common.atomic_file({str(target)!r}) as tmp:
    torch.save({{"step": 2, "big": torch.zeros(1000)}}, tmp)
    with common.atomic_dir({str(folder)!r}) as d:
        open(os.path.join(d, "w.bin"), "wb").write(b"new, half")
        os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert (folder / "w.bin").read_bytes() == b"old"
    with common.atomic_file(str(target)) as tmp:  # leftovers of the killed write do not get in the way
        torch.save({"step": 3}, tmp)
    assert torch.load(target, weights_only=True) == {"step": 3}


# -----------------------------------------------------------------------------
# SDXL: the same sampler with two text encoders, the pooled embedding and the time ids


@pytest.mark.parametrize("latents_stats", [False, True])
def test_sdxl_sampler_matches_diffusers_xl_pipeline(latents_stats, tiny_sdxl, tmp_path):
    """sample.py's CLI on a tiny SDXL folder equals StableDiffusionXLPipeline + DDIMScheduler to 1/255: the family is
    read from model_index.json, "" becomes zeros (force_zeros_for_empty_prompt), and a "!" in a prompt is tokenised
    by tokenizer_2 (pad token "!") exactly as diffusers does. With latents_mean / latents_std in the VAE config (some
    SDXL-family VAEs), the decode un-standardises the latents as the pipeline does."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    if latents_stats:
        tiny_sdxl = variant(tiny_sdxl, tmp_path, vae={"latents_mean": [0.3, -0.2, 0.1, 0.5],
                                                       "latents_std": [2.0, 0.5, 1.5, 0.8]})
    prompts = ["a red circle on a blue background", "wow!!! a green square"]
    out = tmp_path / "xl"
    r = run_sample_cli("--model", tiny_sdxl, *sum([["--prompt", p] for p in prompts], []), "--seed", "2",
                       "--ddim_steps", "6", "--out", str(out))
    assert r.returncode == 0, r.stderr
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    ref_pipe.scheduler = DDIMScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = np.stack([np.asarray(im).astype(int) for im in ref_pipe(
        prompts, num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(2)).images])
    ours = read_pngs(out, 2)
    assert ours.std() > 20 and np.abs(ours - ref).max() <= 1
    if latents_stats:
        return
    pipe = sample.load_pipeline(tiny_sdxl)
    assert pipe.xl and pipe.zero_uncond
    uncond = sample.encode_uncond(pipe, 1)
    assert not uncond["encoder_hidden_states"].any() and not uncond["added_cond_kwargs"]["text_embeds"].any()
    assert uncond["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]


# -----------------------------------------------------------------------------
# A stock diffusers pipeline in, what the method needs out (Pipe.from_diffusers)

@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_a_stock_pipeline_becomes_a_pipe_that_samples_as_it_does(family, tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux):
    """Pipe.from_diffusers on StableDiffusion(XL|3)Pipeline.from_pretrained: the family read from its parts, every
    network frozen (a grad step reaches the LoRA weights alone, none of the VAE's or the text encoders'), DDIM built
    from the UNet families' own scheduler config (the tiny SD folder ships SD 1.5's PNDM config: its grid would repeat
    a timestep), and the same images as the stock pipeline with DDIM (SD 3: its own flow scheduler)."""
    import diffusers
    folder = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}[family]
    cls = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
           "flux": "FluxPipeline"}
    stock = getattr(diffusers, cls[family]).from_pretrained(folder)
    stock.set_progress_bar_config(disable=True)
    assert all(p.requires_grad for p in stock.vae.parameters())  # as diffusers loads it
    pipe = sample.Pipe.from_diffusers(stock)
    assert pipe.family == family and pipe.denoiser is (stock.unet if family in ("sd", "sdxl") else stock.transformer)
    flow = family in ("sd3", "flux")
    assert type(pipe.scheduler).__name__ == ("FlowMatchEulerDiscreteScheduler" if flow else "DDIMScheduler")
    if family == "sd":
        assert type(stock.scheduler).__name__ == "PNDMScheduler"
        ts = sample.ddim_schedule(pipe.scheduler, 10)[0]
        assert len(ts) == len(set(ts.tolist())) == 10
    if not flow:
        stock.scheduler = diffusers.DDIMScheduler.from_config(stock.scheduler.config)
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(4), 32, 32)
    ours = sample.generate(pipe, PROMPTS[:2], latents, 4, 7.0, progress=False)
    ref = stock(PROMPTS[:2], height=32, width=32, num_inference_steps=4, guidance_scale=7.0,
                generator=torch.Generator().manual_seed(4), output_type="pt").images
    assert ours.std() > 0.05
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    sample.add_lora(pipe.denoiser, "task1", seed=0)
    sample.set_adapters(pipe.denoiser, ["task1"], trainable="task1")
    with torch.no_grad():
        for k, p in sample.lora_params(pipe.denoiser, "task1").items():
            p.add_(0.1) if "lora_B" in k else None  # B != 0: the A matrices get gradients too
    images, _ = sample.sample(pipe, sample.encode_prompts(pipe, PROMPTS[:2], (32, 32)),
                              sample.encode_uncond(pipe, 2, (32, 32)), latents, 3, 7.0, grad_steps=1)
    images.mean().backward()
    with_grad = {id(p) for m in (stock.vae, stock.text_encoder, pipe.denoiser) for p in m.parameters()
                 if p.grad is not None}
    assert with_grad == {id(p) for p in sample.lora_params(pipe.denoiser, "task1").values()}


def test_a_stock_pipeline_the_sampler_cannot_follow_is_refused_in_one_line(tiny_sd, tiny_sd3):
    """A scheduler without an alpha-bar schedule under a UNet, a flow scheduler other than FlowMatchEulerDiscrete
    under SD 3, and a DDIM config with dynamic thresholding: one line each (UserError, a ValueError)."""
    import diffusers
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd)
    sd.scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="no alpha-bar schedule"):
        sample.Pipe.from_diffusers(sd)
    sd.scheduler = diffusers.DDIMScheduler(thresholding=True)
    with pytest.raises(UserError, match="dynamic thresholding"):
        sample.Pipe.from_diffusers(sd)
    sd3 = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    sd3.scheduler = diffusers.FlowMatchHeunDiscreteScheduler.from_config(sd3.scheduler.config)
    with pytest.raises(UserError, match="FlowMatchEulerDiscreteScheduler's grid, not FlowMatchHeunDiscreteScheduler"):
        sample.Pipe.from_diffusers(sd3)


def test_a_seeded_adapter_starts_the_same_and_leaves_the_global_generator_alone(tiny_sd):
    pipe = sample.load_pipeline(tiny_sd)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    for name in ("a", "b"):
        sample.add_lora(pipe.denoiser, name, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    a, b = (list(sample.lora_params(pipe.denoiser, n).values()) for n in ("a", "b"))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and any(x.abs().sum() > 0 for x in a)
    sample.add_lora(pipe.denoiser, "c", seed=8)
    assert not all(torch.equal(x, y) for x, y in zip(a, sample.lora_params(pipe.denoiser, "c").values()))
