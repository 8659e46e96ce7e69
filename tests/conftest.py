"""Shared fixtures: a tiny Stable Diffusion pipeline with random weights, saved in the hub's on-disk format
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), so tests run the real from_pretrained
code offline. Everything here builds in about a second on a CPU."""
import json
import os
import re
import shutil
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach a hub from the tests
# OpenMP threads that spin while waiting make tiny ops up to 100x slower whenever another process shares the
# cores (measured: 14 ms vs 1.3 s per tiny UNet call on 2 busy cores). Set before torch loads; subprocesses inherit.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402  (a dependency of huggingface_hub)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest-xdist workers share the cores: one share each
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_tokenizer(folder):
    """A CLIP BPE tokenizer with a character-level vocabulary and no merges, written as vocab.json + merges.txt
    (transformers 5 silently ignores CLIPTokenizer(vocab_file=...), so we load it back from the folder)."""
    import string
    from transformers import CLIPTokenizer
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)  # byte-level BPE maps these to themselves
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=16)
    assert tok("red")["input_ids"][1:-1] == [vocab["r"], vocab["e"], vocab["d</w>"]]
    return tok


def build_tiny_pipeline(folder, seed=0):
    """Random-weight SD pipeline: 32x32 images, 16x16x4 latents, ~0.2M parameters. Scheduler saved as SD 1.5's
    PNDM config, as on the hub, so loading exercises the PNDM -> DDIM config path."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(os.path.join(folder, "_tok"))
    # Cross-attention (where the LoRA adapters go) at the 8x8 level only: at 16x16, self-attention over 256 tokens
    # took a fifth of every tiny training run.
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    # Random weights give near-flat images; larger conv_out weights give images with visible structure, so
    # that pixel comparisons in the tests are meaningful.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(2)
        unet.conv_out.weight.mul_(5)
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)  # its config file is replaced below
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # The scheduler config exactly as SD 1.5's hub repo has it (PNDM, with clip_sample false, which a
    # PNDMScheduler built in code would not write and which a DDIM built from its config would default to true).
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                   "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                   "clip_sample": False}, f)
    return folder


def build_tiny_sdxl(folder, seed=0):
    """Random-weight SDXL pipeline in the hub layout: two text encoders (the second with a projection, whose pooled
    output and the six time ids feed the UNet's added embedding), tokenizer_2 with SDXL's pad token "!", an
    EulerDiscreteScheduler config as on the hub. 32x32 images, ~0.4M parameters."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(os.path.join(folder, "_tok"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"), pad_token="!", model_max_length=16)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32 + 16, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32, scaling_factor=0.13025)
    common = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=16, **common))
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(2)
        unet.conv_out.weight.mul_(5)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False
                              ).save_pretrained(folder)
    return folder


def build_tiny_sd3(folder, t5=True, seed=0):
    """Random-weight SD 3 pipeline in the hub layout: an SD3Transformer2DModel (patch 2, 16 latent channels, dual
    attention in block 0, RMS QK norm, as SD 3.5), two CLIPTextModelWithProjection, T5 (a small Unigram tokenizer:
    transformers 5 rebuilds T5TokenizerFast as Unigram on load) or none, a 16-channel AutoencoderKL with a shift and no
    quant convs, FlowMatchEulerDiscreteScheduler(shift=3.0). T5's width is the joint attention width, at least the two
    CLIP widths summed (the pipeline zero-pads the CLIP states up to it). 32x32 images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(os.path.join(folder, "_tok"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"), pad_token="!", model_max_length=16)
    common = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, hidden_act="gelu", hidden_size=32, projection_dim=32)
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**common)) for _ in range(2)]
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    t5_tokenizer, t5_encoder = tiny_t5(64) if t5 else (None, None)
    with torch.no_grad():  # structure in the images (see build_tiny_pipeline)
        vae.decoder.conv_out.weight.mul_(2)
        transformer.proj_out.weight.mul_(5)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, tokenizer=tokenizer,
        text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer_2=tokenizer_2, text_encoder_3=t5_encoder,
        tokenizer_3=t5_tokenizer).save_pretrained(folder)
    return folder


def build_tiny_flux(folder, guidance=True, seed=0):
    """Random-weight FLUX.1 pipeline in the hub layout: a FluxTransformer2DModel with one joint and one single block
    (dev-like with the guidance embedding, schnell-like without), CLIP's pooled output and T5 (the small Unigram
    tokenizer of build_tiny_sd3), a 4-channel AutoencoderKL with FLUX's scale and shift, and FLUX's
    FlowMatchEulerDiscreteScheduler config (dynamic shifting). Latents are packed 2 x 2: 32 px images are 64 tokens."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(os.path.join(folder, "_tok"))
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu"))
    t5_tokenizer, t5 = tiny_t5(64)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    with torch.no_grad():  # structure in the images (see build_tiny_pipeline)
        vae.decoder.conv_out.weight.mul_(2)
        transformer.proj_out.weight.mul_(5)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                 tokenizer_2=t5_tokenizer, transformer=transformer).save_pretrained(folder)
    return folder


def tiny_t5(width):
    """A small T5 encoder of `width` and its Unigram tokenizer (transformers 5 rebuilds T5TokenizerFast as Unigram on
    load, so a WordLevel one would not load back)."""
    import string
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (p + c, -2.0) for c in string.ascii_lowercase + string.digits + "!.,'" for p in ("", "\u2581")]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=width, d_ff=64, d_kv=16, num_layers=1,
                                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return tokenizer, encoder


def shared(tmp_path_factory, worker_id, name, make):
    """make(folder) -> str, done once per test session however many pytest-xdist workers ask for it: the first
    builds it under a file lock in the folder that all workers share, the others wait and reuse it.
    -> (folder, what make returned)"""
    root = tmp_path_factory.getbasetemp()
    root = root if worker_id == "master" else root.parent  # under xdist each worker's basetemp is ROOT/popen-gwN
    folder, done = root / "shared" / name, root / "shared" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if not done.exists():
            try:
                text = make(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # a half-made folder would fail the next worker oddly
                raise
            done.write_text(text)
    return folder, done.read_text()


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory, worker_id):
    """Path of a tiny SDXL-format model folder (built once per test session)."""
    return str(shared(tmp_path_factory, worker_id, "tiny_sdxl", lambda f: build_tiny_sdxl(str(f)))[0])


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory, worker_id):
    """Path of a tiny SD 3 folder with a T5 encoder (built once per test session)."""
    return str(shared(tmp_path_factory, worker_id, "tiny_sd3", lambda f: build_tiny_sd3(str(f)))[0])


@pytest.fixture(scope="session")
def tiny_sd3_no_t5(tmp_path_factory, worker_id):
    """Path of a tiny SD 3 folder saved without T5 (model_index.json lists text_encoder_3 as null)."""
    return str(shared(tmp_path_factory, worker_id, "tiny_sd3_no_t5", lambda f: build_tiny_sd3(str(f), t5=False))[0])


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory, worker_id):
    """Path of a tiny FLUX.1-dev-like folder (the guidance embedding; T5 at 512 tokens)."""
    return str(shared(tmp_path_factory, worker_id, "tiny_flux", lambda f: build_tiny_flux(str(f)))[0])


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory, worker_id):
    """Path of a tiny FLUX.1-schnell-like folder (no guidance input; T5 at 256 tokens)."""
    return str(shared(tmp_path_factory, worker_id, "tiny_flux_schnell",
                      lambda f: build_tiny_flux(str(f), guidance=False))[0])


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory, worker_id):
    """Path of a tiny SD-format model folder (built once per test session)."""
    return str(shared(tmp_path_factory, worker_id, "tiny_sd", lambda f: build_tiny_pipeline(str(f)))[0])


# -----------------------------------------------------------------------------
# train_rid.py runs on the tiny model, shared by several test files: each made once per session, on first use.

# Small but real: 2 tasks x 3 steps, 4 DDIM steps, K=2, 4 evaluation images, a checkpoint after every step.
RUN = ["--rewards", "brightness,saturation", "--iters", "3", "--ddim_steps", "4", "--grad_steps", "2",
       "--batch_size", "2", "--eval_n", "4", "--eval_batch_size", "2", "--lr", "0.02", "--save_every", "1",
       "--lora_alpha", "8"]


def train(model, out, *extra, method="rid", wait=True, launcher=None, env=None):
    """train_rid.py as a user runs it (later flags win, as in argparse); method None: train_rid.py's default, or
    the --method in extra."""
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "train_rid.py"), "--model", model, "--out", str(out),
                                            *(["--method", method] if method else []), *RUN, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="session")
def trained(tiny_sd, tmp_path_factory, worker_id):
    """trained(method, *flags, env=None, model=None) -> (run folder, stdout) of a finished run on `model` (a tiny
    folder; none = tiny_sd); each distinct call trains once per session (env: extra environment variables, such as the
    fault injection's). Tests may read the folder but not change it: copy it first."""
    def make(method, flags, env, model, out):
        r = train(model or tiny_sd, out, *flags, method=method, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    def get(method, *flags, env=None, model=None):
        words = (method, *flags, *(f"{k}={v}" for k, v in sorted((env or {}).items())))
        words += (os.path.basename(model),) if model else ()
        name = "run_" + re.sub(r"[^\w.=,-]+", "_", "_".join(words))
        return shared(tmp_path_factory, worker_id, name, lambda out: make(method, flags, env, model, out))
    return get


def assert_loaded_whole(folder, net, adapter):
    """Every tensor of the LoRA file in `folder` became a weight of adapter `adapter` in `net` (the denoiser a loader
    filled): as many LoRA weights as the file has tensors, holding the same numbers (sums compared, in float64)."""
    from safetensors.torch import load_file
    from sample import LORA_WEIGHTS, lora_params
    file = load_file(os.path.join(folder, LORA_WEIGHTS))
    loaded = lora_params(net, adapter)
    assert len(loaded) == len(file) > 0, f"{len(loaded)} of the file's {len(file)} tensors loaded"
    total = lambda tensors: sorted(round(t.double().sum().item(), 9) for t in tensors)
    assert total(loaded.values()) == total(file.values())
