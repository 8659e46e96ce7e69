"""
bench.py: what one reward fine-tuning step costs, next to the work it cannot avoid. For one model and one batch it
times, in one process, round by round (so a slow spell of a shared machine hits every phase alike):
  (a) sample     our DDIM sampler without grad: encode prompt and "", draw latents, S guided steps, decode
  (b) diffusers  diffusers' StableDiffusion(XL)Pipeline around the same modules: same batch, steps, guidance, seed
  (c) adapters   one training step of --method adapters: an earlier adapter active and frozen, the current one
                 trained (K-step grad window, VAE decode and reward with grad, backward, clipping, AdamW)
  (d) rid        the same step with RID's EMA-teacher matching and the EMA update
  and the other methods' steps: naive and soup (one adapter active), l2 (adapters + the L2 pull).
Every training phase calls train_rid.py's own step helpers (losses.step_losses, ema_update, l2_pull), so it
times the step that training runs. It prints a markdown table (median seconds, images/s, peak
memory per phase) and the ratios (a)/(b), (c)/(a), (d)/(c) and each method's step over adapters'; warm-up rounds
count neither in time nor in memory. On a CPU it adds the same from the process's CPU time, which load from other
processes barely moves. --json FILE writes every figure.

CPU, the shipped toy model (a few minutes on 2 idle cores):
    python bench.py --model toy --batch_size 8 --json out/bench_toy.json
GPU, the Stable Diffusion 1.5 or SDXL shapes with random weights (nothing to download); the defaults are the model's
own size (512 / 1024 px), 50 DDIM steps, guidance 7.5, K=1 and bf16 on CUDA:
    python bench.py --model sd15-arch --batch_size 1 --json out/sd15_b1.json
    python bench.py --model sd15-arch --batch_size 4 --json out/sd15_b4.json
    python bench.py --model sd15-arch --batch_size 4 --sweep     # each memory lever flipped alone, with its effect
    python bench.py --model sdxl-arch --batch_size 1 --checkpoint_decode --json out/sdxl_b1.json
Peak memory is torch.cuda.max_memory_allocated on a GPU and the process's peak RSS on a CPU (weights included).

Without a GPU, the peak memory a GPU would need for one rid step: every network on the meta device (shapes, no
storage) under torch's MemTracker, with attention counted as a fused kernel holds it (a minute or two each on a CPU;
the peak does not depend on the number of sampling steps, so 4 save time):
    python bench.py --model sd35-arch --batch_size 1 --estimate --ddim_steps 4           # as given
    python bench.py --model sd35-arch --batch_size 1 --estimate --sweep --ddim_steps 4   # each memory lever
On a first GPU, everything the project cannot measure without one (under 8 minutes on one GPU, nothing downloaded):
    python bench.py --gpu_check
"""
import argparse, ctypes, gc, json, os, statistics, subprocess, sys, tempfile, time

import torch

import rewards
from common import UserError, check_seed, one_line_errors, pick_device_dtype, seed_for, write_json
from losses import ema_update, l2_pull, step_losses
from sample import (DEFAULTS, Pipe, add_lora, cache_prompts, check_eta, encode_prompts, encode_uncond,
                    flux_text_length, image_size, initial_latents, load_pipeline, lora_params, sample, set_adapters)

PHASES = ("sample", "diffusers", "naive", "adapters", "rid", "l2", "soup", "reward")
parser = one_line_errors(argparse.ArgumentParser(description="rid: time and memory of sampling and training steps"))
# model and batch
parser.add_argument("--model", default="toy", help="'toy' (shipped), 'sd15-arch' / 'sdxl-arch' / 'sd35-arch' / "
                    "'flux-arch' (their shapes, random weights), or a folder or hub id")
parser.add_argument("--reward", default=None, help="a rewards.py name, or 'aesthetic-arch' (ViT-L/14 + MLP, random "
                    "weights); none = aesthetic-arch for the -arch models, brightness otherwise")
parser.add_argument("--reward_path", default=None, help="NAME=PATH: local weights of --reward (as train_rid.py's)")
parser.add_argument("--batch_size", type=int, default=4, help="images per sampling pass and per optimiser step")
parser.add_argument("--height", type=int, default=None, help="image height in px; none = the model's")
parser.add_argument("--width", type=int, default=None, help="image width in px; none = the model's default")
parser.add_argument("--prompt", default="a red circle on a blue background", help="every image's prompt (cost-neutral)")
# sampler
parser.add_argument("--ddim_steps", type=int, default=None, help="sampling steps S, the same in all phases; none = the "
                    "family's default (50; SD 3, FLUX.1: 28)")
parser.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance; 1 = none; none = the "
                    "family's default (7.5; SD 3: 7.0; FLUX.1: 3.5, an input of its transformer)")
parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic")
# training step
parser.add_argument("--grad_steps", type=int, default=1, help="K: the last K DDIM steps keep their graph (DRaFT-K)")
parser.add_argument("--lora_rank", type=int, default=4, help="LoRA rank r of each of the two adapters")
# memory levers (each one's effect: --sweep)
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype of the frozen "
                    "networks; none = bfloat16 on cuda, float32 on cpu; LoRA weights stay fp32")
parser.add_argument("--checkpoint_decode", action="store_true", help="recompute the VAE decode in backward, per block")
parser.add_argument("--checkpoint_reward", action="store_true", help="recompute the reward model in backward")
parser.add_argument("--no_checkpointing", action="store_true", help="keep grad-window UNet activations (no recompute)")
parser.add_argument("--cache_prompts", action="store_true", help="encode the prompt once and drop the text encoders "
                    "(as train_rid.py's; not with the diffusers phase, which needs them)")
parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step, each of batch_size/grad_accum "
                    "images, gradients accumulated")
parser.add_argument("--compile", action="store_true", help="torch.compile the UNet forward; compiling falls in warm-up")
# measurement
parser.add_argument("--phases", default="sample,diffusers,adapters,rid", help=f"comma list from {','.join(PHASES)}")
parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (allocator, caches, compilation)")
parser.add_argument("--repeats", type=int, default=5, help="timed rounds; each phase reports its median")
parser.add_argument("--device", default=None, help="cuda or cpu; none = cuda when available")
parser.add_argument("--seed", type=int, default=0, help="seed of the latents")
parser.add_argument("--json", default="", help="also write every figure to this file; '' = none")
parser.add_argument("--sweep", action="store_true", help="instead: the rid step as given and with each memory lever "
                    "flipped, each in a fresh process")
parser.add_argument("--estimate", action="store_true", help="instead: the peak memory of one rid step on a GPU, "
                    "estimated without one (every network on the meta device, torch's MemTracker); with --sweep, also "
                    "with each memory lever flipped; --dtype defaults to bfloat16 here")
parser.add_argument("--gpu_check", action="store_true", help="instead: on one CUDA GPU, nothing downloaded, each "
                    "-arch model at its own size as the docs run it: two rid steps with the measured peak beside the "
                    "estimate, the step against sampling, and our sampler against diffusers'")
parser.add_argument("--quickstart", action="store_true", help="instead: run the README's quick start (train_rid.py "
                    "--model toy, into a temporary folder) and time its parts: load, each evaluation, each task")

# -----------------------------------------------------------------------------
# The -arch models: the published configurations (unet/, vae/, text_encoder(_2)/config.json of stable-diffusion-v1-5
# and stable-diffusion-xl-base-1.0; vision_config of openai/clip-vit-large-patch14), keys that shape the compute only.
SD15_UNET = dict(  # 859,520,964 parameters
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    use_linear_projection=False)
SDXL_UNET = dict(  # 2,567,463,684 parameters
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
SD_VAE = dict(  # 83,653,863; SDXL's has the same shapes (scaling_factor 0.13025, force_upcast)
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215)
CLIP_L14_TEXT = dict(  # SD 1.5's text encoder and SDXL's first = the text tower of CLIP ViT-L/14, 123,060,480
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0,
    eos_token_id=2, pad_token_id=1)
CLIP_BIGG_TEXT = dict(  # SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower, with its projection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280, bos_token_id=0,
    eos_token_id=2, pad_token_id=1)
CLIP_L14_VISION = dict(  # the image tower the aesthetic reward runs, 303,179,776
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)
# Stable Diffusion 3.5 Medium (transformer/, vae/ and scheduler/ configs of stabilityai/stable-diffusion-3.5-medium):
# the MMDiT-X with dual attention in its first 13 blocks and QK norm, a 16-channel VAE with a shift, CLIP-L and
# CLIP-G with their projections, and T5-XXL's encoder (google/t5-v1_1-xxl's shapes).
SD35M_TRANSFORMER = dict(  # 2,243,171,520 parameters (the model card rounds the model to 2.5B)
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(SD_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, force_upcast=True,
               use_quant_conv=False, use_post_quant_conv=False)
T5_XXL = dict(  # the encoder only: 4,762,310,656 parameters
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
# FLUX.1 [dev] (transformer/, vae/ and scheduler/ configs of black-forest-labs/FLUX.1-dev): 19 joint and 38 single
# blocks with the guidance embedding (schnell: the same without it), a 16-channel VAE with a shift and no quant
# convs, CLIP-L's text tower (its pooled output) and T5-XXL's encoder, the dynamically shifted flow scheduler.
FLUX_DEV_TRANSFORMER = dict(  # 11,901,408,320 parameters
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)  # 83,819,683
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                      use_dynamic_shifting=True)


def random_weights(build, device, dtype):
    """Build a module with random weights in seconds: shapes on the meta device, then storage, then one block of
    uniform noise tiled into every weight, scaled by 1/sqrt(fan_in) as torch's default init bounds it. (The default
    init draws billions of numbers one by one: about 40 s for SD 1.5 on 2 CPU cores.) Norms get weight 1, biases 0."""
    with torch.device("meta"):
        module = build()
    module = module.to(dtype).to_empty(device=device)
    if str(device) == "meta":  # shapes only (the parameter-count test): nothing to fill
        return module.requires_grad_(False).eval()
    pool = torch.rand(1_000_003, device=device).to(dtype) * 2 - 1  # odd length: tiled rows do not repeat in step
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or p.dim() < 2:
                    p.fill_(1.0 if name == "weight" else 0.0)
                    continue
                flat, (k, r) = p.view(-1), divmod(p.numel(), pool.numel())
                flat[:k * pool.numel()].view(k, pool.numel()).copy_(pool.expand(k, -1))
                flat[k * pool.numel():].copy_(pool[:r])
                p.mul_(p[0].numel() ** -0.5)
        for name, b in module.named_buffers():  # to_empty left garbage there: CLIP's position ids, SD 3's sincos grid
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
                continue
            from diffusers.models.embeddings import get_2d_sincos_pos_embed
            assert name.endswith("pos_embed.pos_embed"), f"unexpected buffer {name}: fill it in random_weights"
            patch = module.get_submodule(name.rsplit(".", 1)[0])
            b.copy_(get_2d_sincos_pos_embed(b.shape[-1], patch.pos_embed_max_size, base_size=patch.base_size,
                                            interpolation_scale=patch.interpolation_scale, output_type="pt")[None])
    return module.requires_grad_(False).eval()


def char_tokenizer():
    """A stand-in CLIP tokenizer: one token per character, padded to 77 as SD's (cost-neutral: the length is what counts)."""
    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        chars = [chr(c) for c in range(33, 127)]
        vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")  # no merges
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def t5_char_tokenizer():
    """A stand-in T5 tokenizer: one piece per character (a Unigram model), padded to SD 3's 256 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(32, 127)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def arch_pipe(model, device, dtype):
    """sd15-arch / sdxl-arch / sd35-arch / flux-arch: the real shapes with random weights."""
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                           SD3Transformer2DModel, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    build = lambda make: random_weights(make, device, dtype)
    clip_g = lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT))
    if model == "flux-arch":
        return Pipe(family="flux", denoiser=build(lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)),
                    vae=build(lambda: AutoencoderKL(**FLUX_VAE)),
                    text_encoder=build(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))), tokenizer=char_tokenizer(),
                    text_encoder_2=build(lambda: T5EncoderModel(T5Config(**T5_XXL))), tokenizer_2=t5_char_tokenizer(),
                    scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER))
    if model == "sd35-arch":
        return Pipe(family="sd3", denoiser=build(lambda: SD3Transformer2DModel(**SD35M_TRANSFORMER)),
                    vae=build(lambda: AutoencoderKL(**SD3_VAE)),
                    text_encoder=build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L14_TEXT))),
                    tokenizer=char_tokenizer(), text_encoder_2=build(clip_g), tokenizer_2=char_tokenizer(),
                    text_encoder_3=build(lambda: T5EncoderModel(T5Config(**T5_XXL))), tokenizer_3=t5_char_tokenizer(),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    xl = model == "sdxl-arch"
    return Pipe(family="sdxl" if xl else "sd", denoiser=build(lambda: UNet2DConditionModel(**(SDXL_UNET if xl else SD15_UNET))),
                vae=build(lambda: AutoencoderKL(**SD_VAE)), text_encoder=build(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))),
                tokenizer=char_tokenizer(), scheduler=DDIMScheduler(**SD_SCHEDULER),
                text_encoder_2=build(clip_g) if xl else None, tokenizer_2=char_tokenizer() if xl else None, zero_uncond=xl)


def load_bench_reward(name, path, device, dtype):
    if name != "aesthetic-arch":
        return rewards.load_reward(name, path, device=device, dtype=dtype)
    from transformers import CLIPConfig, CLIPModel  # the whole CLIPModel, text tower too, as load_reward holds it
    clip = random_weights(lambda: CLIPModel(CLIPConfig(text_config=CLIP_L14_TEXT, vision_config=CLIP_L14_VISION,
                                                       projection_dim=768)), device, dtype)
    head = random_weights(rewards.aesthetic_mlp, device, dtype)  # the real 768-1024-128-64-16-1 head
    return rewards.CLIPReward(clip, head=head, dtype=dtype).eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# Peak memory of one phase: on CUDA the allocator's peak; on CPU the process's peak resident set (weights +
# activations + libraries), reset per phase through /proc/self/clear_refs (Linux), else ru_maxrss (monotone).

def reset_peak(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return "cuda max_memory_allocated"
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the reset starts from live memory
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return "process peak RSS (VmHWM, reset per phase)"
    except OSError:
        return "process peak RSS since start (ru_maxrss, monotone: later phases include earlier peaks)"


def read_peak(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    if os.path.exists("/proc/self/status"):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def to_argv(config):
    """A parsed-flags dict back into a command line (for --sweep's child processes)."""
    argv = []
    for k, v in config.items():
        if v is True:
            argv.append(f"--{k}")
        elif v not in (False, None, ""):
            argv += [f"--{k}", str(v)]
    return argv


def levers(base):
    """The memory levers, each flipped alone: [(flag, {changed settings})], "as given" first."""
    variants = [("as given", {}), ("--dtype", {"dtype": "float32" if base["dtype"] == "bfloat16" else "bfloat16"})]
    if base["ddim_steps"] is None or base["ddim_steps"] >= 2 * base["grad_steps"]:
        variants.append(("--grad_steps", {"grad_steps": 2 * base["grad_steps"]}))
    variants += [(f"--{k}", {k: not base[k]}) for k in ("checkpoint_decode", "checkpoint_reward", "no_checkpointing",
                                                        "cache_prompts")]
    if base["batch_size"] > 1 and base["grad_accum"] == 1:
        variants.append(("--grad_accum", {"grad_accum": base["batch_size"]}))
    return variants


def sweep(args):
    """The rid step once as given, then once per lever flipped, each in a fresh process (clean peak memory)."""
    device, dtype = pick_device_dtype(args.device, args.dtype)
    base = {**vars(args), "sweep": False, "json": "", "phases": "rid", "device": device, "dtype": str(dtype)[6:]}
    variants = levers(base)
    if device.startswith("cuda"):  # inductor on CPU compiles C++ for minutes: GPU only
        variants.append(("--compile", {"compile": not args.compile}))
    print("| lever | setting | rid step, median s | vs as given | peak memory | vs as given |")
    print("|---|---|---|---|---|---|")
    results = []
    for lever, change in variants:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            argv = [sys.executable, os.path.abspath(__file__), *to_argv({**base, **change}), "--json", out]
            r = subprocess.run(argv, capture_output=True, text=True)
            setting = ", ".join(f"{k}={v}" for k, v in change.items()) or "-"
            if r.returncode:  # an out-of-memory here is itself a finding: report it and go on
                why = (r.stderr.strip().splitlines() or ["?"])[-1][:100]
                results.append({"lever": lever, "change": change, "error": why})
                print(f"| {lever} | {setting} | failed: {why} | | | |")
                continue
            with open(out) as f:
                fig = json.load(f)["phases"]["rid"]
        results.append({"lever": lever, "change": change, **fig})
        (s, m), first = (fig["median_s"], fig["peak_memory_bytes"]), results[0]
        s0, m0 = first.get("median_s", float("nan")), first.get("peak_memory_bytes", float("nan"))
        print(f"| {lever} | {setting} | {s:.3f} | x{s / s0:.2f} | {m / 2**30:.2f} GiB | {(m - m0) / 2**30:+.2f} GiB |")
    return {"sweep": results}

def quickstart(args):
    """`python train_rid.py --model toy` as the README runs it (rid, with naive beside it in its own process), timed
    as a whole and, from both runs' results.json, part by part."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_rid.py"),
                            "--model", "toy", "--out", os.path.join(tmp, "rid")], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise UserError(f"the quick start failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        runs = {name: json.load(open(os.path.join(tmp, *path, "results.json")))["train"]
                for name, path in (("rid", ["rid"]), ("naive (beside)", ["rid", "baseline_naive"]))}
    rows = [("load model and rewards", "load_seconds", None)]
    rows += [(f"evaluation, stage {k}", "evaluation_seconds", k) for k in range(len(runs["rid"]["evaluation_seconds"]))]
    rows += [(f"task {k + 1}, training", "seconds_total", k) for k in range(len(runs["rid"]["seconds_total"]))]
    print("| part | " + " | ".join(runs) + " |\n|---|" + "---|" * len(runs))
    for label, key, k in rows:
        print(f"| {label} | " + " | ".join(f"{v[key] if k is None else v[key][k]:.1f} s" for v in runs.values()) + " |")
    print(f"| the whole command, wall clock | {wall:.1f} s |")
    return {"wall_seconds": wall, "runs": runs, "cpu": f"{os.cpu_count()} cores"}

# -----------------------------------------------------------------------------
# The phases, each a method of no arguments that does one round of its work.

def reference_pipeline(pipe):
    """diffusers' own pipeline around the same modules (DDIM for the UNet families, as rid samples them)."""
    import diffusers
    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    if pipe.family == "flux":
        ref = diffusers.FluxPipeline(**parts, transformer=pipe.denoiser, scheduler=pipe.scheduler,
                                     text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    elif pipe.flow:
        ref = diffusers.StableDiffusion3Pipeline(**parts, transformer=pipe.denoiser, scheduler=pipe.scheduler,
                                                 text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                                                 text_encoder_3=pipe.text_encoder_3, tokenizer_3=pipe.tokenizer_3)
    else:
        parts.update(unet=pipe.denoiser, scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config))
        ref = (diffusers.StableDiffusionXLPipeline(**parts, text_encoder_2=pipe.text_encoder_2,
                                                   tokenizer_2=pipe.tokenizer_2, add_watermarker=False) if pipe.xl else
               diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False))
    ref.set_progress_bar_config(disable=True)
    return ref


class Phases:
    """What each phase does once, on adapters as in task 2 of a real run: task0 active and frozen (B random, so not a
    no-op) and task1 trained, through train_rid.py's own step helpers (losses.py)."""

    def __init__(self, args, pipe, reward, device, dtype, H, W):
        self.args, self.pipe, self.reward, self.device, self.dtype = args, pipe, reward, device, dtype
        self.H, self.W = H, W
        self.prompts, self.micro = [args.prompt] * args.batch_size, args.batch_size // args.grad_accum
        for name in ("task0", "task1"):
            add_lora(pipe.denoiser, name, args.lora_rank, args.lora_rank)
        with torch.no_grad():
            for k, p in lora_params(pipe.denoiser, "task0").items():
                if "lora_B" in k:
                    p.normal_(0, 0.01)
        self.params = lora_params(pipe.denoiser, "task1")  # {full name: fp32 parameter}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=1e-3)
        self.ema = {k: p.detach().clone() for k, p in self.params.items()}  # RID's teacher: the EMA of task1
        self.ref = None  # diffusers' pipeline, built on first use
        g = torch.Generator().manual_seed(args.seed)  # the reward phase's input images
        self.pixels = torch.rand(args.batch_size, 3, H, W, generator=g).to(device)
        if args.compile:
            pipe.denoiser.compile()  # the UNet forward only, as gpt-fast compiles only the hot function

    def run(self, name):
        return {"sample": self.sample, "diffusers": self.diffusers, "reward": self.reward_step}.get(
            name, lambda: self.train_step(name))()

    def sample(self):  # what diffusers' __call__ does (encode prompt and "", draw latents, S steps, decode), our way
        a, (H, W), B = self.args, (self.H, self.W), self.args.batch_size
        set_adapters(self.pipe.denoiser, ["task0", "task1"])
        with torch.no_grad():
            g = torch.Generator().manual_seed(a.seed)
            cond, uncond = encode_prompts(self.pipe, self.prompts, (H, W)), encode_uncond(self.pipe, B, (H, W))
            latents = initial_latents(self.pipe, B, g, H, W).to(self.device)  # (B, 4, H/8, W/8)
            return sample(self.pipe, cond, uncond, latents, a.ddim_steps, a.guidance_scale, a.eta, generator=g)[0]

    def diffusers(self):
        a = self.args
        self.ref = self.ref or reference_pipeline(self.pipe)
        set_adapters(self.pipe.denoiser, ["task0", "task1"])
        extra = {"max_sequence_length": flux_text_length(self.pipe)} if self.pipe.family == "flux" else \
            {} if self.pipe.flow else {"eta": a.eta}
        return self.ref(self.prompts, height=self.H, width=self.W, num_inference_steps=a.ddim_steps,
                        guidance_scale=a.guidance_scale, **extra, generator=torch.Generator().manual_seed(a.seed),
                        output_type="pt").images

    def use_adapters(self, method):  # naive and soup train with one adapter active, the others on top of task0
        set_adapters(self.pipe.denoiser, ["task1"] if method in ("naive", "soup") else ["task0", "task1"],
                     trainable="task1")

    def loss(self, method, lo):
        """The loss of micro-batch `lo` (its first image's index), as its share of the batch mean."""
        a, B = self.args, self.args.batch_size
        g = torch.Generator().manual_seed(seed_for("train", a.seed, lo))
        latents = initial_latents(self.pipe, self.micro, g, self.H, self.W).to(self.device)
        r, loss_rid = step_losses(self.pipe, self.reward, self.prompts[lo:lo + self.micro], latents, a.ddim_steps,
                                  a.guidance_scale, a.eta, a.grad_steps, self.ema if method == "rid" else None,
                                  not a.no_checkpointing, a.checkpoint_decode, a.checkpoint_reward)
        return -r.sum() / B + loss_rid * self.micro / B

    def update(self, method):  # the rest of the step, after the micro-batches' backward
        if method == "l2":
            l2_pull(self.pipe.denoiser, "task1").backward()
        torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
        self.optimizer.step()
        if method == "rid":
            ema_update(self.ema, self.params, 0.99)
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, method):
        """One optimiser step of `method`, through the same helpers as train_rid.py's loop."""
        self.use_adapters(method)
        for lo in range(0, self.args.batch_size, self.micro):  # micro-batches; their gradients add up
            self.loss(method, lo).backward()
        self.update(method)

    def reward_step(self):  # the reward alone: one forward and backward to the images (B, 3, H, W)
        images = self.pixels.clone().requires_grad_(True)
        self.reward(images.to(self.dtype), self.prompts).sum().backward()


def time_phases(args, run, phases, device):
    """Round robin over the phases, so that a slow spell of a shared machine hits every phase alike. On a CPU we
    also take the process's CPU time (all threads): time spent waiting for a core shared with other processes does
    not count in it, so its ratios hold up under load where wall-clock ratios wobble."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, cpu_times, peaks, images = {k: [] for k in phases}, {k: [] for k in phases}, {k: 0 for k in phases}, {}
    for round_ in range(args.warmup + args.repeats):
        for name in phases:
            memory_kind = reset_peak(device)
            t, c = time.perf_counter(), time.process_time()
            images[name] = run(name)
            sync()
            if round_ >= args.warmup:  # warm-up rounds count neither in time nor in memory
                times[name].append(time.perf_counter() - t)
                cpu_times[name].append(time.process_time() - c)
                peaks[name] = max(peaks[name], read_peak(device))
    return times, cpu_times, peaks, images, memory_kind

# -----------------------------------------------------------------------------
# Report: a markdown table, the ratios, and every figure in JSON

LABELS = {"sample": "(a) rid sampler, no grad", "diffusers": "(b) diffusers pipeline", "adapters": "(c) train step, adapters",
          "rid": "(d) train step, rid", "naive": "train step, naive", "l2": "train step, l2", "soup": "train step, soup",
          "reward": "the reward alone, forward + backward"}
RATIOS = [("a_over_b", "(a)/(b) ours vs diffusers", "sample", "diffusers", "1.0 | -"),
          ("c_over_a", "(c)/(a) train step vs sampling", "adapters", "sample", "1.3 | 1.3"),
          ("d_over_c", "(d)/(c) rid vs adapters", "rid", "adapters", "1.10 | 1.05"),
          ("naive_over_c", "naive vs adapters", "naive", "adapters", "- | -"),
          ("l2_over_c", "l2 vs adapters", "l2", "adapters", "- | -"),
          ("soup_over_c", "soup vs adapters", "soup", "adapters", "- | -")]


def report(args, figures, times, cpu_times, peaks, images, cpu):
    B = args.batch_size
    print("\n| phase | median s | images/s | peak memory |" + (" median CPU s |" if cpu else ""))
    print("|---|---|---|---|" + ("---|" if cpu else ""))
    for name in times:
        med, cpu_med = statistics.median(times[name]), statistics.median(cpu_times[name])
        figures["phases"][name] = {"median_s": med, "times_s": times[name], "images_per_s": B / med,
                                   "peak_memory_bytes": peaks[name]}
        if cpu:
            figures["phases"][name].update(cpu_median_s=cpu_med, cpu_times_s=cpu_times[name])
        print(f"| {LABELS[name]} | {med:.3f} | {B / med:.2f} | {peaks[name] / 2**30:.2f} GiB |"
              + (f" {cpu_med:.3f} |" if cpu else ""))
    print(f"memory: {figures['memory_kind']}; {figures['resident_before_bytes'] / 2**30:.2f} GiB resident before the "
          f"first phase")
    ph = figures["phases"]
    for out, field in [("ratios", "median_s")] + ([("cpu_ratios", "cpu_median_s")] if cpu else []):
        figures[out] = {k: ph[n][field] / ph[d][field] for k, _, n, d, _ in RATIOS if n in ph and d in ph}
    if figures["ratios"]:
        print("\n| ratio | wall clock | target toy CPU | target SD GPU |" + (" by CPU time |" if cpu else ""))
        print("|---|---|---|---|" + ("---|" if cpu else ""))
    for key, text, _, _, target in RATIOS:
        if key in figures["ratios"]:
            print(f"| {text} | {figures['ratios'][key]:.3f} | {target} |"
                  + (f" {figures['cpu_ratios'][key]:.3f} |" if cpu else ""))
    if "sample" in images and "diffusers" in images:  # the same work gives the same images
        diff = (images["sample"].float() - images["diffusers"].float()).abs()
        figures["max_abs_diff_a_b"], figures["mean_abs_diff_a_b"] = diff.max().item(), diff.mean().item()
        print(f"|image (a) - image (b)|: max {figures['max_abs_diff_a_b']:.2e}, mean {figures['mean_abs_diff_a_b']:.2e} "
              f"(pixels in [0, 1])")


# -----------------------------------------------------------------------------
# Peak memory on a GPU, without one (--estimate): every network on the meta device, where tensors have shapes but no
# storage, and one rid step under torch's MemTracker, which counts what the step holds by kind (parameters, buffers,
# gradients, optimiser state, activations, temporaries). It knows nothing of the CUDA context (about 0.5 GB), the
# caching allocator's slack or kernel workspaces: a GPU needs that much more.

class FusedAttention(torch.autograd.Function):
    """F.scaled_dot_product_attention as CUDA's fused kernels hold it (flash attention, Dao et al. 2022, and the
    memory-efficient kernel; PyTorch picks one of them for these shapes): q, k, v, the output and a float32
    log-sum-exp per query row are kept for backward, never the N x N matrix, which the meta device's math path would
    count (1 GiB per self-attention call for SD 1.5 at 512 px). Shapes only: the values are meta's nothing."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fused_sdpa(query, key, value, *args, **kwargs):  # F.scaled_dot_product_attention's signature (FLUX passes keywords)
    return FusedAttention.apply(query, key, value)


def tracked_peak(phases, method="rid"):
    """The second optimiser step of `method` (the first made Adam's state, which every later step holds) on the meta
    device under MemTracker. -> {kind: bytes} at the step's peak, and "Total"."""
    from copy import deepcopy
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):  # the global peak only: MemTracker's per-module peaks cost O(modules) per operation
        def _update_peak_stats(self, peak_state):  # (minutes for one SD 1.5 step); this is its own last loop
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], deepcopy(snap)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # frozen weights refuse the
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)  # grad hook

    class MicroBatch(torch.nn.Module):  # one root call per micro-batch: MemTracker refuses a root module called twice
        def __init__(self, lo):          # in one step, and the sampler calls the denoiser S times
            super().__init__()
            self.lo = lo

        def forward(self):
            return phases.loss(method, self.lo)
    pipe, sdpa = phases.pipe, torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fused_sdpa
    try:
        phases.train_step(method)  # untracked: Adam's state appears in the first step's update
        tracker = Tracker()
        nets = [m for m in (pipe.denoiser, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3,
                            phases.reward) if m is not None]
        tracker.track_external(phases.optimizer, *nets, *phases.ema.values())  # the EMA teacher counts as "Other"
        with tracker:
            for lo in range(0, phases.args.batch_size, phases.micro):
                micro = MicroBatch(lo)  # held until its backward is done (the tracker keeps weak references)
                micro().backward()
            phases.update(method)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return {getattr(k, "value", k): v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("meta")].items()}


def estimate(args):
    """--estimate: one rid step's estimated peak, as given (and with --sweep, with each memory lever flipped).
    -> figures"""
    base = {**vars(args), "dtype": args.dtype or "bfloat16", "device": "meta", "sweep": False}
    print("| lever | setting | weights | gradients + optimiser | activations + temporaries | peak | vs as given |")
    print("|---|---|---|---|---|---|---|")
    rows, gib = [], lambda b: f"{b / 2**30:.2f} GiB"
    for lever, change in levers(base) if args.sweep else [("as given", {})]:
        a = argparse.Namespace(**{**base, **change})
        t0 = time.perf_counter()
        phases = build(a)
        peak = tracked_peak(phases)
        kinds = {k: peak.get(k, 0) for k in ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp")}
        rows.append({"lever": lever, "change": change, "peak_bytes": peak["Total"], "kinds": kinds,
                     "image_size": [phases.H, phases.W], "seconds": time.perf_counter() - t0})
        setting = ", ".join(f"{k}={v}" for k, v in change.items()) or "-"
        print(f"| {lever} | {setting} | {gib(kinds['Parameter'] + kinds['Buffer'])} | "
              f"{gib(kinds['Gradient'] + kinds['Optstate'])} | {gib(kinds['Activation'] + kinds['Temp'])} | "
              f"{gib(peak['Total'])} | {peak['Total'] / rows[0]['peak_bytes']:.2f}x |", flush=True)
    return {"estimate": rows, "config": base}


# -----------------------------------------------------------------------------
# The GPU check (--gpu_check): what a first GPU should confirm, with nothing downloaded (random weights at the real
# shapes), in a few minutes. Each model as docs/speed_and_memory.md runs it, at batch 1 and its own size.
GPU_CHECK = [("sd15-arch", []), ("sdxl-arch", []), ("sd35-arch", []),
             ("sd35-arch", ["--cache_prompts", "--checkpoint_decode"]),  # SD 3.5 as the docs run it in 24 GB
             ("flux-arch", ["--cache_prompts", "--checkpoint_decode"])]  # FLUX.1-dev as the docs run it in 48 GB


def rerun(argv):
    """bench.py again with these flags, in a fresh process (a clean CUDA peak). -> its figures, or {"error": line}"""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "figures.json")
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--json", out], capture_output=True,
                           text=True)
        if r.returncode:  # an out-of-memory here is itself a finding: report it and go on
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
        with open(out) as f:
            return json.load(f)


def gpu_check(args):
    """--gpu_check: per model, the meta estimate and two real rid steps (a warm-up and a timed one) in fresh processes;
    the diffusers comparison wherever the text encoders stay (not with --cache_prompts). -> figures"""
    if not torch.cuda.is_available():
        raise UserError("--gpu_check needs a CUDA GPU; without one, `bench.py --estimate` gives the memory figures")
    print("| model | flags | peak, estimated | peak, measured | measured / estimated | rid step / sampling | "
          "ours / diffusers | max abs(ours - diffusers) |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for model, flags in GPU_CHECK:
        common = ["--model", model, "--batch_size", "1", *flags]
        est = rerun([*common, "--estimate", "--ddim_steps", "4"])  # the peak does not depend on S (docs)
        phases = "sample,rid" if "--cache_prompts" in flags else "sample,diffusers,rid"
        run = rerun([*common, "--phases", phases, "--warmup", "1", "--repeats", "1"])
        rows.append({"model": model, "flags": flags, "estimate": est, "run": run})
        if "error" in est or "error" in run:
            print(f"| {model} | {' '.join(flags)} | failed: {est.get('error') or run.get('error')} |||||")
            continue
        e, ph = est["estimate"][0]["peak_bytes"], run["phases"]
        m, step = ph["rid"]["peak_memory_bytes"], ph["rid"]["median_s"] / ph["sample"]["median_s"]
        print(f"| {model} | {' '.join(flags) or '-'} | {e / 2**30:.2f} GiB | {m / 2**30:.2f} GiB | {m / e:.2f} | "
              f"{step:.2f} | {run['ratios'].get('a_over_b', float('nan')):.2f} | "
              f"{run.get('max_abs_diff_a_b', float('nan')):.2e} |", flush=True)
    return {"gpu_check": rows, "device": torch.cuda.get_device_name()}


ARCH = ("sd15-arch", "sdxl-arch", "sd35-arch", "flux-arch")
LIBRARIES = ("torch", "diffusers", "transformers", "peft")


def build(args):
    """The model (an -arch model's shapes with random weights, or a folder or hub id), the reward and the two adapters,
    on args.device in args.dtype; the family's defaults filled into args. -> Phases"""
    device, dtype = pick_device_dtype(args.device, args.dtype)
    torch.manual_seed(args.seed)
    arch = args.model in ARCH
    pipe = arch_pipe(args.model, device, dtype) if arch else load_pipeline(args.model, device, dtype)
    check_eta(pipe.family, args.eta)
    args.ddim_steps = args.ddim_steps or DEFAULTS[pipe.family][0]
    args.guidance_scale = DEFAULTS[pipe.family][1] if args.guidance_scale is None else args.guidance_scale
    if not 1 <= args.grad_steps <= args.ddim_steps:
        raise UserError("need 1 <= --grad_steps <= --ddim_steps")
    args.reward = args.reward or ("aesthetic-arch" if arch else "brightness")
    name, _, path = (args.reward_path or "").partition("=")
    if args.reward_path and name != args.reward:
        raise UserError(f"--reward_path '{args.reward_path}' must be {args.reward}=PATH (the --reward it is for)")
    try:
        reward = load_bench_reward(args.reward, path or None, device, dtype)
    except ValueError as e:
        raise UserError(str(e))
    H, W = image_size(pipe, args.height, args.width)
    if args.cache_prompts:  # meta cannot copy to the CPU: the estimate keeps the few contexts where they are made
        cache_prompts(pipe, [args.prompt], (H, W), store="meta" if device == "meta" else "cpu")
    return Phases(args, pipe, reward, device, dtype, H, W)


def measure(args):
    """The default mode: every phase of --phases timed, round by round, with its peak memory. -> figures"""
    t0 = time.perf_counter()
    phases = build(args)
    pipe, device, dtype = phases.pipe, phases.device, phases.dtype
    B, S, K, n = args.batch_size, args.ddim_steps, args.grad_steps, args.grad_accum
    print(f"model {args.model} ({sum(p.numel() for p in pipe.denoiser.parameters()) / 1e6:.0f}M UNet parameters), "
          f"reward {args.reward}, {device} {str(dtype)[6:]}, {B} images of {phases.H}x{phases.W}, {S} DDIM steps, "
          f"guidance {args.guidance_scale}; built in {time.perf_counter() - t0:.1f} s")
    branches = 2 if args.guidance_scale > 1 and pipe.family != "flux" else 1  # FLUX.1: one branch, guidance an input
    print(f"per training step: {S * n} denoiser calls of batch {branches * phases.micro}, "
          f"{K * n} of them with grad; rid adds {K * n} teacher forwards and {(K - 1) * n} student forwards; "
          f"{sum(p.numel() for p in phases.params.values()):,} trainable LoRA weights")
    gc.collect()
    resident = torch.cuda.memory_allocated() if device.startswith("cuda") else read_peak(device)
    times, cpu_times, peaks, images, memory_kind = time_phases(args, phases.run, args.phases.split(","), device)
    figures = {"config": vars(args), "device": torch.cuda.get_device_name() if device.startswith("cuda") else
               f"cpu, {torch.get_num_threads()} threads", "dtype": str(dtype)[6:], "reward": args.reward,
               "height": phases.H, "width": phases.W, "memory_kind": memory_kind, "resident_before_bytes": resident,
               "phases": {}, "versions": {m: __import__(m).__version__ for m in LIBRARIES}}
    report(args, figures, times, cpu_times, peaks, images, not device.startswith("cuda"))
    return figures


def main():
    args = parser.parse_args()
    S, K, B = args.ddim_steps, args.grad_steps, args.batch_size
    if K < 1 or (S is not None and K > S):  # S none: checked once the model's family is known
        raise UserError("need 1 <= --grad_steps <= --ddim_steps")
    if B < 1 or args.grad_accum < 1 or B % args.grad_accum:
        raise UserError(f"--batch_size ({B}) must be a positive multiple of --grad_accum ({args.grad_accum})")
    if args.repeats < 1 or args.warmup < 0 or not set(args.phases.split(",")) <= set(PHASES):
        raise UserError(f"need --repeats >= 1, --warmup >= 0 and --phases from {','.join(PHASES)}")
    if args.cache_prompts and "diffusers" in args.phases.split(",") and not (args.estimate or args.sweep):
        raise UserError("--cache_prompts drops the text encoders, which the diffusers phase needs; drop one of them")
    check_seed("--seed", args.seed)
    mode = (quickstart if args.quickstart else gpu_check if args.gpu_check else estimate if args.estimate else
            sweep if args.sweep else measure)
    figures = mode(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
