"""bench.py: the -arch models have the published parameter counts (built on the meta device: no memory, no time),
random_weights fills every tensor as it says, and the script runs end to end on the tiny SD and SDXL folders with
every phase, writing figures that are consistent with each other. Not a timed test: nothing here asserts a speed."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, ROOT)
import bench  # noqa: E402

ALL = ("sample", "diffusers", "naive", "adapters", "rid", "l2", "soup")


def run_bench(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def count(build):
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def test_arch_models_have_the_published_sizes():
    """SD 1.5: UNet 859,520,964, VAE 83,653,863, text encoder 123,060,480; SDXL base: UNet 2,567,463,684 (the
    parameter counts of the hub checkpoints' configurations)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    assert count(lambda: UNet2DConditionModel(**bench.SD15_UNET)) == 859_520_964
    assert count(lambda: AutoencoderKL(**bench.SD_VAE)) == 83_653_863
    assert count(lambda: CLIPTextModel(CLIPTextConfig(**bench.CLIP_L14_TEXT))) == 123_060_480
    assert count(lambda: UNet2DConditionModel(**bench.SDXL_UNET)) == 2_567_463_684
    big_g = count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**bench.CLIP_BIGG_TEXT)))
    assert 690e6 < big_g < 700e6  # OpenCLIP ViT-bigG/14's text tower with its projection: ~695M


def test_sd35_medium_arch_has_its_published_shapes():
    """SD 3.5 Medium from its published configs, as bench.py builds it (on the meta device: no memory): the MMDiT-X
    (24 blocks of width 1536, dual attention in the first 13, QK norm) 2,243,171,520 parameters (the model card says
    2.5B for the model), T5-XXL's encoder 4,762,310,656, the 16-channel VAE without quant convs 83,819,683, CLIP-L
    with its projection 123,650,304, CLIP-G's text tower ~695M; 1024 px by default."""
    pipe = bench.arch_pipe("sd35-arch", "meta", torch.bfloat16)
    n = lambda net: sum(p.numel() for p in net.parameters())
    assert n(pipe.denoiser) == 2_243_171_520 and 2.2e9 < n(pipe.denoiser) < 2.6e9
    assert n(pipe.text_encoder_3) == 4_762_310_656
    assert n(pipe.vae) == 83_819_683 and n(pipe.text_encoder) == 123_650_304 and 690e6 < n(pipe.text_encoder_2) < 700e6
    assert pipe.flow and pipe.size == (1024, 1024) and pipe.denoiser.config.in_channels == 16


def test_flux_dev_arch_has_its_published_shapes():
    """FLUX.1 [dev] from its published configs (on the meta device): the transformer, 19 joint and 38 single blocks
    of width 3072 with the guidance embedding, 11,901,408,320 parameters (the model card: 12B); the 16-channel VAE
    83,819,683; CLIP-L's text tower 123,060,480 (its pooled output); T5-XXL's encoder; 1024 px by default, 16 px a
    size step (VAE 8 x the 2 x 2 packing)."""
    from sample import size_step
    pipe = bench.arch_pipe("flux-arch", "meta", torch.bfloat16)
    n = lambda net: sum(p.numel() for p in net.parameters())
    assert n(pipe.denoiser) == 11_901_408_320 and n(pipe.vae) == 83_819_683 and n(pipe.text_encoder) == 123_060_480
    assert n(pipe.text_encoder_2) == 4_762_310_656 and pipe.family == "flux" and pipe.size == (1024, 1024)
    assert size_step(pipe.vae.config, pipe.denoiser.config) == 16


def test_random_weights_fills_every_tensor():
    from transformers import CLIPTextConfig, CLIPTextModel
    config = dict(bench.CLIP_L14_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    m = bench.random_weights(lambda: CLIPTextModel(CLIPTextConfig(**config)), "cpu", torch.float32)
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.dim() >= 2:  # uniform in +-1/sqrt(fan_in), and not constant
            assert p.abs().max() <= p[0].numel() ** -0.5 + 1e-6 and p.std() > 0, name
    pos = dict(m.named_buffers())["embeddings.position_ids"]
    assert torch.equal(pos[0], torch.arange(77))  # the buffer, not to_empty's garbage


def check_figures(path, stdout, phases):
    with open(path) as f:
        figures = json.load(f)
    assert set(figures["phases"]) == set(phases)
    for name in phases:
        phase = figures["phases"][name]
        assert phase["median_s"] > 0 and phase["images_per_s"] == pytest.approx(figures["config"]["batch_size"] / phase["median_s"])
        assert phase["peak_memory_bytes"] >= 2**20  # bytes, not KB or GB: a process holding a model
        assert phase["median_s"] == pytest.approx(statistics.median(phase["times_s"]))
        assert bench.LABELS[name] in stdout
    for key, _, num, den, _ in bench.RATIOS:  # every ratio is the quotient of the figures it names
        if num in phases and den in phases:
            assert figures["ratios"][key] == pytest.approx(figures["phases"][num]["median_s"] / figures["phases"][den]["median_s"])
            assert figures["cpu_ratios"][key] == pytest.approx(
                figures["phases"][num]["cpu_median_s"] / figures["phases"][den]["cpu_median_s"])
    return figures


@pytest.mark.slow
def test_bench_tiny_model_every_phase(tiny_sd, tmp_path):
    out = tmp_path / "bench.json"
    r = run_bench("--model", tiny_sd, "--batch_size", "2", "--grad_accum", "2", "--ddim_steps", "3", "--grad_steps", "2",
                  "--checkpoint_decode", "--checkpoint_reward", "--warmup", "0",
                  "--repeats", "2", "--phases", ",".join(ALL), "--json", str(out))
    assert r.returncode == 0, r.stderr
    figures = check_figures(out, r.stdout, ALL)
    # (a) and (b) did the same work: in fp32 they make the same images (parity is tested in test_sample.py too)
    assert figures["max_abs_diff_a_b"] <= 1e-5
    assert figures["config"]["grad_accum"] == 2 and figures["height"] == 32


@pytest.mark.slow
def test_bench_tiny_sdxl_bf16(tiny_sdxl, tmp_path):
    """The SDXL path (two text encoders, StableDiffusionXLPipeline as the reference) at the GPU default: frozen
    networks in bf16, LoRA weights in fp32."""
    out = tmp_path / "bench.json"
    r = run_bench("--model", tiny_sdxl, "--batch_size", "2", "--ddim_steps", "3", "--phases", "sample,diffusers,rid",
                  "--dtype", "bfloat16", "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    figures = check_figures(out, r.stdout, ("sample", "diffusers", "rid"))
    assert figures["dtype"] == "bfloat16"
    # Both samplers ran in bf16: in fp32 their images are equal (the test above), here they are not. They still
    # agree with each other (mean 0.04 here) far better than either agrees with fp32 on this random model (0.2).
    assert figures["max_abs_diff_a_b"] > 0 and figures["mean_abs_diff_a_b"] < 0.1


@pytest.mark.slow
def test_bench_tiny_sd3(tiny_sd3, tmp_path):
    """The flow path: StableDiffusion3Pipeline as the reference (same images in fp32), RID's step on the transformer."""
    out = tmp_path / "bench.json"
    r = run_bench("--model", tiny_sd3, "--batch_size", "2", "--ddim_steps", "3", "--phases", "sample,diffusers,rid",
                  "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    figures = check_figures(out, r.stdout, ("sample", "diffusers", "rid"))
    assert figures["max_abs_diff_a_b"] <= 1e-5


def test_sweep_command_lines_parse_back():
    """--sweep re-runs bench.py with one lever flipped: the command line it builds must parse back to the same flags."""
    args = bench.parser.parse_args(["--model", "sd15-arch", "--checkpoint_decode", "--grad_accum", "2", "--batch_size", "4"])
    config = {**vars(args), "dtype": "bfloat16", "no_checkpointing": True}
    assert vars(bench.parser.parse_args(bench.to_argv(config))) == config


def test_bad_flags_are_one_line():
    r = run_bench("--batch_size", "3", "--grad_accum", "2")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_estimate_counts_every_weight_and_what_checkpointing_saves(tiny_sd):
    """--estimate on the meta device: at the step's peak it holds every weight of the pipeline and the reward at its
    own dtype (the frozen networks in bf16, the adapters in fp32, the reward's head in fp32), as counted by hand, and
    Adam's state of the trained adapter (2 x 4 bytes per weight); turning checkpointing off adds activations."""
    import argparse
    base = vars(bench.parser.parse_args(["--model", tiny_sd, "--batch_size", "2", "--ddim_steps", "3", "--estimate",
                                         "--reward", "toypref", "--device", "meta", "--dtype", "bfloat16"]))
    peaks = {}
    for off in (False, True):
        phases = bench.build(argparse.Namespace(**{**base, "no_checkpointing": off}))
        peaks[off] = bench.tracked_peak(phases)
    pipe = phases.pipe
    weights = {id(p): p for m in (pipe.denoiser, pipe.vae, pipe.text_encoder, phases.reward) for p in m.parameters()}
    lora = {id(p) for n, p in pipe.denoiser.named_parameters() if ".lora_" in n}
    assert {p.dtype for k, p in weights.items() if k in lora} == {torch.float32}
    assert {p.dtype for p in pipe.denoiser.parameters() if id(p) not in lora} == {torch.bfloat16}
    assert peaks[False]["Parameter"] == sum(p.numel() * p.element_size() for p in weights.values())
    assert peaks[False]["Optstate"] >= 8 * sum(p.numel() for p in phases.params.values())
    assert peaks[True]["Activation"] + peaks[True]["Temp"] > peaks[False]["Activation"] + peaks[False]["Temp"]


def test_fused_attention_keeps_what_a_flash_kernel_keeps():
    """The estimate's stand-in for F.scaled_dot_product_attention saves q, k, v, the output and a float log-sum-exp per
    row for backward: O(N), where the meta device's math path saves the N x N attention weights."""
    q, k, v = (torch.empty(1, 2, 1024, 16, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        out = bench.FusedAttention.apply(q, k, v)
    fused = sum(saved)
    assert fused == 4 * q.numel() * 2 + 2 * 1024 * 4  # q, k, v, out in bf16; one fp32 per row and head
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert sum(saved) > 2 * 1024 * 1024 * 2 > fused  # at least one (heads x N x N) matrix
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_gpu_check_needs_a_gpu():
    r = run_bench("--gpu_check")
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_estimate_runs_flux_whose_attention_is_called_with_keywords(tiny_flux):
    """FLUX's attention processor calls F.scaled_dot_product_attention with keyword arguments, which the estimate's
    stand-in takes too; with --cache_prompts neither text encoder's weights are on the device."""
    import argparse
    args = vars(bench.parser.parse_args(["--model", tiny_flux, "--batch_size", "1", "--ddim_steps", "2", "--height", "32",
                                         "--width", "32", "--estimate", "--reward", "brightness", "--device", "meta",
                                         "--dtype", "bfloat16", "--cache_prompts"]))
    phases = bench.build(argparse.Namespace(**args))
    peak = bench.tracked_peak(phases)
    assert phases.pipe.text_encoder is None and phases.pipe.text_encoder_2 is None
    weights = {id(p): p for m in (phases.pipe.denoiser, phases.pipe.vae) for p in m.parameters()}
    assert peak["Parameter"] == sum(p.numel() * p.element_size() for p in weights.values())
    assert peak["Activation"] > 0
