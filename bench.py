"""
bench.py: what one reward fine-tuning step costs, next to the work it cannot avoid. For one model and one batch it
times, in one process, round by round (so a slow spell of a shared machine hits every phase alike):
  (a) our DDIM sampler without grad: encode prompt and "", draw latents, S guided steps, decode (what diffusers does)
  (b) diffusers' StableDiffusionPipeline around the same modules: same batch, steps, guidance, seed
  (c) one training step of --method adapters: an earlier adapter active and frozen, the current one trained
      (K-step grad window, VAE decode and reward with grad, backward, clipping, AdamW), as train_rid.py does it
  (d) the same step with RID's EMA-teacher matching (--method rid) and the EMA update
It prints a markdown table (median seconds, images/s, peak memory per phase) and the ratios (a)/(b), (c)/(a),
(d)/(c); warm-up rounds count neither in time nor in memory. On a CPU it adds the same from the process's CPU
time, which load from other processes barely moves. --json FILE writes every figure.

CPU, the shipped toy model (about 2.5 minutes on 2 idle cores; on cores shared with other work, prefix
OMP_WAIT_POLICY=PASSIVE, which on idle cores made it 2.9x slower):
    python bench.py --model toy --batch_size 8 --json out/bench_toy.json
GPU, Stable Diffusion 1.5 shapes (nothing to download: see sd15-arch below); the defaults are 512 px, 50 DDIM steps,
guidance 7.5, K=1 and bf16 on CUDA:
    python bench.py --model sd15-arch --batch_size 1 --json out/sd15_b1.json
    python bench.py --model sd15-arch --batch_size 4 --json out/sd15_b4.json
    python bench.py --model sd15-arch --batch_size 4 --sweep   # each memory lever flipped alone, with its effect
--model sd15-arch builds SD 1.5's UNet, VAE and text encoder, and the CLIP ViT-L/14 of the aesthetic reward, from
their published configurations with random weights: time and memory depend on the shapes, not on the values.
Peak memory is torch.cuda.max_memory_allocated on a GPU and the process's peak RSS on a CPU (weights included).
"""
import argparse, ctypes, gc, json, os, random, statistics, subprocess, sys, tempfile, time

import torch
from torch.utils.checkpoint import checkpoint

import rewards
from sample import (Pipe, UserError, add_lora, atomic_file, encode_prompts, initial_latents, load_pipeline,
                    lora_params, one_line_errors, pick_device_dtype, run_cli, sample, set_adapters, teacher_loss)

parser = one_line_errors(argparse.ArgumentParser(description="rid: time and memory of sampling and training steps"))
# model and batch
parser.add_argument("--model", default="toy", help="'toy' (shipped), 'sd15-arch' (SD 1.5 shapes, random weights), "
                    "or an SD folder / hub id")
parser.add_argument("--reward", default=None, help="a rewards.py name, or 'aesthetic-arch' (ViT-L/14 + MLP, random "
                    "weights); none = aesthetic-arch for sd15-arch, brightness otherwise")
parser.add_argument("--batch_size", type=int, default=4, help="images per sampling pass and per optimiser step")
parser.add_argument("--height", type=int, default=None, help="image height in px; none = the model's (sd15-arch: 512)")
parser.add_argument("--width", type=int, default=None, help="image width in px; none = the model's default")
parser.add_argument("--prompt", default="a red circle on a blue background", help="every image's prompt (cost-neutral)")
# sampler
parser.add_argument("--ddim_steps", type=int, default=50, help="DDIM steps S, the same in all four phases")
parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance; 1 = none")
parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic")
# training step
parser.add_argument("--grad_steps", type=int, default=1, help="K: the last K DDIM steps keep their graph (DRaFT-K)")
parser.add_argument("--match_steps", type=int, default=0, help="M: extra teacher-matched steps from the no-grad part")
parser.add_argument("--lora_rank", type=int, default=4, help="LoRA rank r of each of the two adapters")
# memory levers (each one's effect: --sweep)
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype of the frozen "
                    "networks; none = bfloat16 on cuda, float32 on cpu; LoRA weights stay fp32")
parser.add_argument("--checkpoint_decode", action="store_true", help="recompute the VAE decode in backward")
parser.add_argument("--checkpoint_reward", action="store_true", help="recompute the reward model in backward")
parser.add_argument("--no_checkpointing", action="store_true", help="keep grad-window UNet activations (no recompute)")
parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step, each of batch_size/grad_accum "
                    "images, gradients accumulated")
parser.add_argument("--compile", action="store_true", help="torch.compile the UNet forward; compiling falls in warm-up")
# measurement
parser.add_argument("--phases", default="sample,diffusers,adapters,rid", help="comma list of the phases to time")
parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (allocator, caches, compilation)")
parser.add_argument("--repeats", type=int, default=5, help="timed rounds; each phase reports its median")
parser.add_argument("--device", default=None, help="cuda or cpu; none = cuda when available")
parser.add_argument("--seed", type=int, default=0, help="seed of the latents and of the matched-step draws")
parser.add_argument("--json", default="", help="also write every figure to this file; '' = none")
parser.add_argument("--sweep", action="store_true", help="instead: the rid step as given and with each memory lever "
                    "flipped, each in a fresh process")

# -----------------------------------------------------------------------------
# sd15-arch: the published configurations (unet/config.json, vae/config.json, text_encoder/config.json of
# stable-diffusion-v1-5; vision_config of openai/clip-vit-large-patch14), keys that shape the compute only.
SD15_UNET = dict(  # 859.5M parameters
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    use_linear_projection=False)
SD15_VAE = dict(  # 83.7M
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215)
CLIP_L14_TEXT = dict(  # SD 1.5's text encoder = the text tower of CLIP ViT-L/14, 123M
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0,
    eos_token_id=2, pad_token_id=1)
CLIP_L14_VISION = dict(  # the image tower the aesthetic reward runs, 304M
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def random_weights(build, device, dtype):
    """Build a module with random weights in seconds: shapes on the meta device, then storage, then one block of
    uniform noise tiled into every weight, scaled by 1/sqrt(fan_in) as torch's default init bounds it. (The default
    init draws 1.5B numbers one by one: about 40 s on 2 CPU cores.) Norms get weight 1, biases 0."""
    with torch.device("meta"):
        module = build()
    module = module.to(dtype).to_empty(device=device)
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
        for name, b in module.named_buffers():  # to_empty left garbage there; CLIP's position ids are the only buffers
            assert name.endswith("position_ids"), f"unexpected buffer {name}: fill it in random_weights"
            b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
    return module.requires_grad_(False).eval()


def sd15_arch(device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    with tempfile.TemporaryDirectory() as tmp:  # a stand-in tokenizer: characters, padded to SD's 77 tokens
        chars = [chr(c) for c in range(33, 127)]
        vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")  # no merges: one token per character
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    return Pipe(unet=random_weights(lambda: UNet2DConditionModel(**SD15_UNET), device, dtype),
                vae=random_weights(lambda: AutoencoderKL(**SD15_VAE), device, dtype),
                text_encoder=random_weights(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT)), device, dtype),
                tokenizer=tokenizer, scheduler=DDIMScheduler(**SD_SCHEDULER))


def load_bench_reward(name, device, dtype):
    if name != "aesthetic-arch":
        return rewards.load_reward(name, device=device, dtype=dtype)
    from transformers import CLIPConfig, CLIPModel  # the whole CLIPModel, text tower too, as load_reward holds it
    clip = random_weights(lambda: CLIPModel(CLIPConfig(text_config=CLIP_L14_TEXT, vision_config=CLIP_L14_VISION,
                                                       projection_dim=768)), device, dtype)
    head = random_weights(rewards.aesthetic_mlp, device, dtype)  # the real 768-1024-128-64-16-1 head
    return rewards.CLIPReward(clip, head=head).eval().requires_grad_(False)

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


def sweep(args, device, dtype):
    """The rid step once as given, then once per lever flipped, each in a fresh process (clean peak memory)."""
    base = {**vars(args), "sweep": False, "json": "", "phases": "rid", "device": device, "dtype": str(dtype)[6:]}
    variants = [("as given", {}), ("--dtype", {"dtype": "float32" if base["dtype"] == "bfloat16" else "bfloat16"}),
                ("--grad_steps", {"grad_steps": min(2 * args.grad_steps, args.ddim_steps)})]
    variants += [(f"--{k}", {k: not base[k]}) for k in ("checkpoint_decode", "checkpoint_reward", "no_checkpointing")]
    if args.batch_size > 1 and args.grad_accum == 1:
        variants.append(("--grad_accum", {"grad_accum": args.batch_size}))
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


def write_json(path, figures):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(figures, f, indent=1)


def main():
    args = parser.parse_args()
    phases = args.phases.split(",")
    device, dtype = pick_device_dtype(args.device, args.dtype)
    S, K, M, B = args.ddim_steps, args.grad_steps, args.match_steps, args.batch_size
    if not 1 <= K <= S or not 0 <= M <= S - K:
        raise UserError("need 1 <= --grad_steps <= --ddim_steps and 0 <= --match_steps <= ddim_steps - grad_steps")
    if B < 1 or args.grad_accum < 1 or B % args.grad_accum:
        raise UserError(f"--batch_size ({B}) must be a positive multiple of --grad_accum ({args.grad_accum})")
    if args.repeats < 1 or args.warmup < 0 or not set(phases) <= {"sample", "diffusers", "adapters", "rid"}:
        raise UserError("need --repeats >= 1, --warmup >= 0 and --phases from sample,diffusers,adapters,rid")
    micro = B // args.grad_accum  # images per forward/backward
    if args.sweep:
        figures = sweep(args, device, dtype)
        if args.json:
            write_json(args.json, figures)
        return

    # -------------------------------------------------------------------------
    # Model, reward, and the adapters of task 2 of a real run: task0 active and frozen (its B random, so it is
    # not a no-op), task1 active and trained.
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    pipe = sd15_arch(device, dtype) if args.model == "sd15-arch" else load_pipeline(args.model, device, dtype)
    reward_name = args.reward or ("aesthetic-arch" if args.model == "sd15-arch" else "brightness")
    try:
        reward = load_bench_reward(reward_name, device, dtype)
    except ValueError as e:
        raise UserError(str(e))
    H, W = args.height or pipe.size[0], args.width or pipe.size[1]
    if H % pipe.vae_scale or W % pipe.vae_scale:
        raise UserError(f"--height and --width must be multiples of {pipe.vae_scale} for this model")
    add_lora(pipe.unet, "task0", args.lora_rank, args.lora_rank)
    with torch.no_grad():
        for k, p in lora_params(pipe.unet, "task0").items():
            if "lora_B" in k:
                p.normal_(0, 0.01)
    add_lora(pipe.unet, "task1", args.lora_rank, args.lora_rank)
    set_adapters(pipe.unet, ["task0", "task1"], trainable="task1")
    params = lora_params(pipe.unet, "task1")  # {full name: fp32 parameter}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    ema = {k: p.detach().clone() for k, p in params.items()}  # RID's teacher: the EMA of the current adapter
    if args.compile:
        pipe.unet.compile()  # the UNet forward only, as gpt-fast compiles only the hot function
    prompts = [args.prompt] * B
    guided = args.guidance_scale > 1
    print(f"model {args.model} ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M UNet parameters), reward "
          f"{reward_name}, {device} {str(dtype)[6:]}, {B} images of {H}x{W}, {S} DDIM steps, guidance "
          f"{args.guidance_scale}; built in {time.perf_counter() - t0:.1f} s")
    print(f"per training step: {S * args.grad_accum} UNet calls of batch {(2 if guided else 1) * micro}, "
          f"{K * args.grad_accum} of them with grad; rid adds {(K + M) * args.grad_accum} teacher forwards and "
          f"{M * args.grad_accum} student forwards; {sum(p.numel() for p in params.values()):,} trainable LoRA weights")

    # -------------------------------------------------------------------------
    # The four phases. (a) and (b) run with the two adapters active, as training does: the same model, the same work.
    def run_ours():  # what diffusers' __call__ does (encode prompt and "", draw latents, S steps, decode), our way
        with torch.no_grad():
            g = torch.Generator().manual_seed(args.seed)
            cond, uncond = encode_prompts(pipe, prompts), encode_prompts(pipe, [""] * B)
            latents = initial_latents(pipe, B, g, H, W).to(device)  # (B, 4, H/8, W/8)
            return sample(pipe, cond, uncond, latents, S, args.guidance_scale, args.eta, generator=g)[0]

    if "diffusers" in phases:
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        ref = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                      unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)

    def run_diffusers():
        return ref(prompts, height=H, width=W, num_inference_steps=S, guidance_scale=args.guidance_scale, eta=args.eta,
                   generator=torch.Generator().manual_seed(args.seed), output_type="pt").images

    matched_rng = random.Random(args.seed)

    def train_step(rid, rid_lambda=1.0, ema_momentum=0.99):  # the two values do not change the cost
        for lo in range(0, B, micro):  # micro-batches; their gradients add up to that of the batch mean
            p = prompts[lo:lo + micro]
            cond, uncond = encode_prompts(pipe, p), encode_prompts(pipe, [""] * micro)
            latents = initial_latents(pipe, micro, torch.Generator().manual_seed(args.seed + lo), H, W).to(device)
            matched = [*range(S - K, S), *matched_rng.sample(range(S - K), M)] if rid else ()
            images, captured = sample(pipe, cond, uncond, latents, S, args.guidance_scale, args.eta, grad_steps=K,
                                      checkpointing=not args.no_checkpointing, checkpoint_decode=args.checkpoint_decode,
                                      capture=matched)  # images (micro, 3, H, W) in [0, 1]
            if args.checkpoint_reward:  # store only the images; the reward network re-runs in backward
                r = checkpoint(reward, images.to(dtype), p, use_reentrant=False).float()
            else:
                r = reward(images.to(dtype), p).float()  # (micro,)
            loss = -r.sum() / B
            if rid:
                context = torch.cat([uncond, cond]) if guided else cond
                loss_rid = teacher_loss(pipe, captured, context, ema, not args.no_checkpointing) * micro / B
                loss = loss + rid_lambda * loss_rid
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        if rid:  # EMA teacher update, right after the optimiser step: A_bar <- m A_bar + (1 - m) A_t
            torch._foreach_lerp_(list(ema.values()), [q.detach() for q in params.values()], 1 - ema_momentum)
        optimizer.zero_grad(set_to_none=True)

    # -------------------------------------------------------------------------
    # Timing: round robin over the phases, so that a slow spell of a shared machine hits every phase alike. On a
    # CPU we also take the process's CPU time (all threads): time spent waiting for a core shared with other
    # processes does not count in it, so its ratios hold up under load where wall-clock ratios wobble.
    run = {"sample": run_ours, "diffusers": run_diffusers, "adapters": lambda: train_step(False),
           "rid": lambda: train_step(True)}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gc.collect()
    resident = torch.cuda.memory_allocated() if device.startswith("cuda") else read_peak(device)
    cpu = not device.startswith("cuda")
    times, cpu_times, peaks, images = {k: [] for k in phases}, {k: [] for k in phases}, {k: 0 for k in phases}, {}
    for round_ in range(args.warmup + args.repeats):
        for name in phases:
            memory_kind = reset_peak(device)
            t, c = time.perf_counter(), time.process_time()
            images[name] = run[name]()
            sync()
            if round_ >= args.warmup:  # warm-up rounds count neither in time nor in memory
                times[name].append(time.perf_counter() - t)
                cpu_times[name].append(time.process_time() - c)
                peaks[name] = max(peaks[name], read_peak(device))

    # -------------------------------------------------------------------------
    # Report: a markdown table, the ratios, and every figure in JSON
    figures = {"config": vars(args), "device": torch.cuda.get_device_name() if device.startswith("cuda") else
               f"cpu, {torch.get_num_threads()} threads", "dtype": str(dtype)[6:], "reward": reward_name,
               "height": H, "width": W, "memory_kind": memory_kind, "resident_before_bytes": resident, "phases": {},
               "versions": {m: __import__(m).__version__ for m in ("torch", "diffusers", "transformers", "peft")}}
    label = {"sample": "(a) rid sampler, no grad", "diffusers": "(b) diffusers StableDiffusionPipeline",
             "adapters": "(c) train step, adapters", "rid": "(d) train step, rid"}
    print("\n| phase | median s | images/s | peak memory |" + (" median CPU s |" if cpu else ""))
    print("|---|---|---|---|" + ("---|" if cpu else ""))
    for name in phases:
        med, cpu_med = statistics.median(times[name]), statistics.median(cpu_times[name])
        figures["phases"][name] = {"median_s": med, "times_s": times[name], "images_per_s": B / med,
                                   "peak_memory_bytes": peaks[name]}
        if cpu:
            figures["phases"][name].update(cpu_median_s=cpu_med, cpu_times_s=cpu_times[name])
        print(f"| {label[name]} | {med:.3f} | {B / med:.2f} | {peaks[name] / 2**30:.2f} GiB |"
              + (f" {cpu_med:.3f} |" if cpu else ""))
    print(f"memory: {memory_kind}; {resident / 2**30:.2f} GiB resident before the first phase")
    ratios = [("a_over_b", "(a)/(b) ours vs diffusers", "sample", "diffusers", "1.0 | -"),
              ("c_over_a", f"(c)/(a) train step (K={K}) vs sampling", "adapters", "sample", "1.3 | 1.3"),
              ("d_over_c", "(d)/(c) rid vs adapters", "rid", "adapters", "1.10 | 1.05")]
    ph = figures["phases"]
    for out, field in [("ratios", "median_s")] + ([("cpu_ratios", "cpu_median_s")] if cpu else []):
        figures[out] = {k: ph[n][field] / ph[d][field] for k, _, n, d, _ in ratios if n in ph and d in ph}
    if figures["ratios"]:
        print("\n| ratio | wall clock | target toy CPU | target sd15-arch GPU |" + (" by CPU time |" if cpu else ""))
        print("|---|---|---|---|" + ("---|" if cpu else ""))
    for key, text, num, den, target in ratios:
        if key in figures["ratios"]:
            print(f"| {text} | {figures['ratios'][key]:.3f} | {target} |"
                  + (f" {figures['cpu_ratios'][key]:.3f} |" if cpu else ""))
    if "sample" in images and "diffusers" in images:  # the same work gives the same images
        figures["max_abs_diff_a_b"] = (images["sample"].float() - images["diffusers"].float()).abs().max().item()
        print(f"max |image (a) - image (b)| = {figures['max_abs_diff_a_b']:.2e} (pixels in [0, 1])")
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    run_cli(main)
