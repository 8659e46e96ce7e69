"""
train_rid.py: Reward Incremental Learning (RIL) with Reward Incremental Distillation (RID).

Fine-tunes a diffusers-format model (SD 1.x, 2.x, SDXL, SD 3.5 or FLUX.1) on a sequence of differentiable rewards,
one task after another (Wang, Mao, Wang, Yamasaki, arXiv 2411.17310). Each optimiser step samples images with guided
DDIM (the flow families: Euler steps), keeps the graph only through the last K denoising steps and the VAE decode
(DRaFT-K), scores them with the task's reward and backpropagates -reward into LoRA weights. After each task it saves
that task's adapter in diffusers' LoRA format, evaluates every reward of the sequence on a fixed evaluation set and
writes what was kept and what was forgotten (results.json, results.md, grid.png, heatmap.png). The losses are in
losses.py, the sampler in sample.py.

Methods (--method; docs/method.md):
  naive     one LoRA adapter trained through all tasks in turn: the forgetting baseline
  adapters  a new adapter per task; earlier ones stay active and frozen (model = W0 + dW_1 + ... + dW_k)
  rid       adapters + matching an EMA teacher: L = -r_k / s_k + lambda * mean (eps_student - sg(eps_teacher))^2
  l2        adapters + an L2 pull of the current adapter's weight change towards zero: + w * ||dW_k||^2
  soup      rewarded soups: each adapter trained from the base model alone; the model after task k is
            W0 + c * (dW_1 + ... + dW_k), c = --soup_weight (1: the sum)
  joint     not sequential: one adapter trained on the mean of all tasks' rewards (each / s_k) at once, for the same
            total budget (T x iters steps), evaluated once: the upper reference that continual learning is judged by

Run it:
  python train_rid.py --model toy                       # CPU, minutes: contrast -> saturation -> brightness
  python train_rid.py --rewards aesthetic,hps                                            # SD 1.5, one GPU
  python train_rid.py --model stabilityai/stable-diffusion-xl-base-1.0 --rewards aesthetic,hps   # SDXL
  torchrun --nproc_per_node=4 train_rid.py --rewards aesthetic,hps                       # same global batch
  python train_rid.py ... --resume                                 # continue a killed or interrupted run

What we simplified or chose ourselves (the paper's code is not public):
  - the teacher is the student with its current adapter replaced by that adapter's EMA (over the factors A and B);
    the matching loss is on eps (the UNet's output turned into eps for v- and x_0-prediction models), both guidance
    branches, at the K grad-window steps, each at its x_t taken as data (detached);
  - each reward is divided by its standard deviation over the base model's evaluation images (s_k), so that one
    lr, lambda and l2 weight mean the same trade-off for rewards of any scale (--no_reward_norm turns it off);
  - a fresh AdamW per task with a constant learning rate; the per-step randomness (prompts, noise, K) is a function
    of (seed, task, step), so a resumed run repeats an uninterrupted one exactly.
"""
import argparse
import importlib
import json
import os
import resource
import shlex
import shutil
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import baseline
from common import (Tracker, UserError, atomic_dir, atomic_file, check_seed, folder_in_use, hold_folder, load_file,
                    one_line_errors, open_run_folder, pick_device_dtype, remove_partial_writes, seed_for, to_pil,
                    to_uint8, write_json, write_text)
from eval import clip_at_hand, eval_set, evaluate, is_toy, ril_metrics, toy_reward_paths, write_report
from losses import ema_update, joint_reward, l2_pull, step_losses, unet_calls_per_step
from report import draw_grid
from rewards import TOY as WEIGHT_FREE, check_reward_name, load_reward
from sample import (DEFAULT_MODEL, DEFAULTS, add_lora, cache_prompts, check_eta, check_size, hub_unreachable,
                    image_size, initial_latents, load_pipeline, lora_params, model_index, save_lora, set_adapters)
from toy_world import TOY_REWARDS, all_captions

# -----------------------------------------------------------------------------
# Settings: every knob is a flag; the defaults are for Stable Diffusion 1.5 at 512 px on one GPU.

METHODS = ["naive", "adapters", "rid", "l2", "soup", "joint"]
parser = one_line_errors(argparse.ArgumentParser(description="Reward incremental fine-tuning with RID."))
# model and tasks
parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, a folder of SD, SDXL, SD 3 or FLUX.1, or 'toy' "
                    "(the shipped model)")
parser.add_argument("--rewards", default=None, help="the task sequence: reward names, comma-separated "
                    f"(default aesthetic,hps; {TOY_REWARDS} with --model toy)")
parser.add_argument("--reward_path", action="append", default=[], help="NAME=PATH: local weights of a reward; repeat")
parser.add_argument("--method", default="rid", choices=METHODS, help="see the docstring")
parser.add_argument("--prompts", default=None, help="training prompts, one per line; none = built-in list")
# sampling (DDIM, classifier-free guidance)
parser.add_argument("--ddim_steps", type=int, default=None, help="sampling steps S per image, DDIM (SD 3, FLUX.1: "
                    "Euler); default 50 (SD 3, FLUX.1: 28, their pipelines'; 20 with --model toy)")
parser.add_argument("--grad_steps", type=int, default=1, help="K: last steps that keep the graph (DRaFT-K)")
parser.add_argument("--random_grad_steps", action="store_true", help="draw K in [1, grad_steps] per step (AlignProp)")
parser.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance; 1 = none (default 7.5; "
                    "SD 3: 7.0; FLUX.1 dev: 3.5, the distilled guidance its transformer takes as an input)")
parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic, 1 = DDPM-like")
parser.add_argument("--height", type=int, default=None, help="image height in px; none = the model's default")
parser.add_argument("--width", type=int, default=None, help="image width in px; none = the model's default")
# optimisation
parser.add_argument("--iters", type=int, default=None, help="optimiser steps per task (default 100; 20 with --model toy)")
parser.add_argument("--batch_size", type=int, default=None,
                    help="images per optimiser step, over all GPUs together (default 4; 8 with --model toy)")
parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step and GPU (memory, not results)")
parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the LoRA weights (no weight decay)")
parser.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the LoRA gradient norm; 0 = no clipping")
parser.add_argument("--no_reward_norm", action="store_true", help="s_k = 1: use each reward in its own units")
parser.add_argument("--lora_rank", type=int, default=4, help="LoRA rank r of each adapter")
parser.add_argument("--lora_alpha", type=float, default=4.0, help="LoRA alpha (the update is scaled by alpha / r)")
# RID and the other baselines' knobs
parser.add_argument("--rid_lambda", type=float, default=3.0, help="lambda: weight of the teacher-matching loss "
                    "(3: our choice from docs/experiments.md)")
parser.add_argument("--rid_trajectory", type=int, default=0, help="M: also match the teacher at M steps drawn anew each "
                    "step from the no-grad part of the trajectory, where layout is decided (0 = the K window steps "
                    "only; docs/experiments.md measures it)")
parser.add_argument("--ema_momentum", type=float, default=0.99, help="m of the EMA teacher; 1 = frozen previous model")
parser.add_argument("--l2_weight", type=float, default=1.0, help="l2: weight w of ||dW_k||^2 (summed over layers)")
parser.add_argument("--soup_weight", type=float, default=1.0, help="soup: weight c of every adapter; 1 = their sum")
# memory and precision
parser.add_argument("--no_checkpointing", action="store_true", help="keep the grad window's denoiser activations "
                    "(faster, more memory)")
parser.add_argument("--checkpoint_decode", action="store_true", help="recompute the VAE decode in backward, per block")
parser.add_argument("--checkpoint_reward", action="store_true", help="recompute the reward model in backward")
parser.add_argument("--cache_prompts", action="store_true", help="encode every prompt once at the start, then drop the "
                    "text encoders: frees their GPU memory (SD 3.5's T5-XXL: 8.9 GiB in bf16)")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="compute dtype of the frozen networks; none = bfloat16 on cuda (float16 where the GPU lacks "
                    "bf16; trained with a loss scaler), float32 on cpu")
parser.add_argument("--device", default=None, help="cuda or cpu; none = cuda when available")
parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser's forward (opt-in: its compile "
                    "time pays back on long runs; docs/speed_and_memory.md)")
# evaluation
parser.add_argument("--eval_n", type=int, default=64, help="images in the fixed evaluation set (one per prompt/seed)")
parser.add_argument("--eval_batch_size", type=int, default=None,
                    help="images per batch and GPU when evaluating; changes no result (default 8; 64 with --model toy)")
# run folder, checkpoints, logging
parser.add_argument("--out", default="runs/rid", help="run folder: adapters, checkpoint, results")
parser.add_argument("--seed", type=int, default=0, help="seed of the training prompts and noise (0 to 2^64 - 1)")
parser.add_argument("--save_every", type=int, default=50, help="checkpoint every N steps (and after every task)")
parser.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
parser.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out and start again")
parser.add_argument("--baseline", default=None, choices=["none"] + METHODS, help="beside the run, in its own "
                    "process, train this method with the same settings into OUT/baseline_METHOD, then draw both grids "
                    "side by side in OUT/compare.png; "
                    "none = skip (default naive with --model toy, none otherwise)")
parser.add_argument("--log", default="none", choices=["none", "tensorboard", "wandb"],
                    help="also log to an experiment tracker (log.jsonl is always written)")
args = parser.parse_args()
given = {k for k, v in vars(args).items() if v != parser.get_default(k)}  # the flags set away from their default
# Defaults that depend on the model: SD 1.5's by default, the steps and guidance of the family's own pipeline (read
# from the model's model_index.json); with --model toy, a run that ends in minutes on a CPU.
family, _ = model_index(args.model)
for flag, sd, toy in (("rewards", "aesthetic,hps", TOY_REWARDS), ("iters", 100, 20), ("batch_size", 4, 8),
                      ("ddim_steps", DEFAULTS[family][0], 20), ("guidance_scale", DEFAULTS[family][1], 7.5),
                      ("eval_batch_size", 8, 64), ("baseline", "none", "naive")):
    if getattr(args, flag) is None:
        setattr(args, flag, toy if is_toy(args.model) else sd)
MAX_NONFINITE = 5  # stop after this many non-finite steps in a row (a NaN loss, an inf gradient)
DIST_TIMEOUT = timedelta(minutes=60)  # a process waits this long for the others at a collective, then fails
# Fault injection for the tests (environment variables, not flags): global steps (1-based) whose reward is made NaN,
# and the global step during which the run sends itself SIGTERM (through the real handler; RID_FAULT_SIGNAL=KILL:
# SIGKILL, which no handler sees, at the start of that step).
FAULT_NAN_STEPS = {int(s) for s in os.environ.get("RID_FAULT_NAN_STEPS", "").split(",") if s.strip()}
FAULT_SIGNAL_STEP = int(os.environ.get("RID_FAULT_SIGNAL_STEP", 0))
FAULT_SIGNAL = getattr(signal, "SIG" + os.environ.get("RID_FAULT_SIGNAL", "TERM"))

# -----------------------------------------------------------------------------
# Validation: every mistake we can see is reported now, in one line, before a model is loaded or a file written.

tasks = [r.strip() for r in args.rewards.split(",") if r.strip()]
if not tasks:
    raise UserError("--rewards is empty; give a comma-separated sequence such as --rewards aesthetic,hps")
for name in tasks:
    try:
        check_reward_name(name)
    except ValueError as e:
        raise UserError(str(e))
reward_paths = toy_reward_paths(args.model)  # a toy model's own toyclip and toypref, unless --reward_path says
for item in args.reward_path:
    name, sep, path = item.partition("=")
    if not sep or name not in tasks:
        raise UserError(f"--reward_path '{item}' must be NAME=PATH with NAME one of --rewards ({', '.join(tasks)})")
    reward_paths[name] = path
for flag in ("iters", "batch_size", "grad_accum", "ddim_steps", "eval_n", "eval_batch_size", "save_every", "lora_rank"):
    if getattr(args, flag) < 1:
        raise UserError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
for flag in ("height", "width"):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
        raise UserError(f"--{flag} must be a positive number of pixels (got {getattr(args, flag)})")
check_seed("--seed", args.seed)
if not 1 <= args.grad_steps <= args.ddim_steps:
    raise UserError(f"--grad_steps (K={args.grad_steps}) must be between 1 and --ddim_steps ({args.ddim_steps}); "
                    f"K = 0 would build no graph and train nothing")
if not 0 <= args.rid_trajectory <= args.ddim_steps - args.grad_steps:
    raise UserError(f"--rid_trajectory (M={args.rid_trajectory}) must be between 0 and the "
                    f"{args.ddim_steps - args.grad_steps} steps before the grad window (--ddim_steps - --grad_steps)")
if args.guidance_scale < 0 or not 0 <= args.eta <= 1:
    raise UserError("--guidance_scale must be at least 0 and --eta in [0, 1]")
check_eta(family, args.eta)
check_size(args.model, family, args.height, args.width)
if not 0 <= args.ema_momentum <= 1 or args.rid_lambda < 0 or args.lr <= 0:
    raise UserError("--ema_momentum must be in [0, 1], --rid_lambda at least 0, --lr positive")
if args.l2_weight < 0 or args.soup_weight <= 0:
    raise UserError("--l2_weight must be at least 0 and --soup_weight positive")
if args.log != "none":
    try:
        importlib.import_module(args.log)  # the optional package, imported only when asked for
    except ImportError:
        raise UserError(f"--log {args.log} needs the {args.log} package: pip install {args.log}")
if args.prompts is not None:
    if not os.path.isfile(args.prompts):
        raise UserError(f"prompt file '{args.prompts}' does not exist")
    with open(args.prompts) as f:
        train_prompts = [line.strip() for line in f if line.strip()]
    if not train_prompts:
        raise UserError(f"prompt file '{args.prompts}' holds no prompts; write one prompt per line")
elif is_toy(args.model):
    train_prompts = all_captions("train")  # the captions seen in pretraining; evaluation uses held-out ones
else:  # our own simple subjects, in the spirit of DDPO's animal prompts, and everyday scenes
    train_prompts = [f"a photo of a {s}" for s in (
        "cat", "dog", "horse", "rabbit", "fox", "owl", "deer", "lion", "panda", "penguin", "turtle", "goldfish",
        "butterfly", "frog", "squirrel", "elephant", "giraffe", "hedgehog", "parrot", "koala")] + [
        "a bowl of fruit on a wooden table", "a red bicycle leaning on a wall", "a cup of coffee on a desk",
        "a lighthouse on a rocky coast", "a street market at dusk", "a snowy mountain cabin", "a vase of tulips",
        "a sailboat on a calm lake", "a city skyline at night", "a cottage garden in spring",
        "a bookshelf in a cosy library", "a plate of pasta", "an old train station", "a forest path in autumn"]

# The processes: torchrun starts one per GPU (set up below, once the run folder is settled); a plain `python` run
# is a world of one. Only the first process speaks and writes.
world = int(os.environ.get("WORLD_SIZE", 1))
rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
master = rank == 0

# Flags that would change nothing with these settings: a warning line each, or one line and exit where the user
# cannot have meant it.
if "baseline" in given and args.baseline != "none" and world > 1:
    raise UserError(f"--baseline {args.baseline} trains beside a one-process run only; under torchrun, train it as "
                    f"a run of its own (--method {args.baseline} --out {args.out}_{args.baseline})")
for flag, owner in (("rid_lambda", "rid"), ("ema_momentum", "rid"), ("rid_trajectory", "rid"), ("l2_weight", "l2"), ("soup_weight", "soup")):
    if flag in given and args.method != owner and master:
        print(f"warning: --{flag} {getattr(args, flag)} changes nothing with --method {args.method} (it is "
              f"{owner}'s); ignored", file=sys.stderr)
if "baseline" in given and args.baseline == args.method and master:
    print(f"warning: --baseline {args.baseline} is this run's own method: no baseline is trained", file=sys.stderr)

# The run folder: refuse to touch an earlier run unless asked; resume only a run with the same settings.
ckpt_path = os.path.join(args.out, "checkpoint.pt")
config = {**vars(args), "command": sys.argv[1:]}  # the flags as given (experiment.py compares them before reusing a run)
# The baseline trained beside this run, in its own process (baseline.py; the toy quick start's), not yet started.
side = (baseline.Baseline(os.path.abspath(__file__), sys.argv[1:], args.baseline, args.out, len(tasks) * args.iters)
        if args.baseline not in ("none", args.method) and world == 1 else None)


def continue_command():
    """The command that continues this run when stopped: the same interpreter, launcher and flags, with --resume and
    without --overwrite (which would delete the run; --resume refuses it), quoted for a shell."""
    own = lambda a, flag: len(a) > 3 and flag.startswith(a.split("=")[0])  # argparse takes unique prefixes too
    flags = [a for a in sys.argv[1:] if not (own(a, "--resume") or own(a, "--overwrite"))]
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # processes on this node
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={here}"] if here > 1 else [])
    # (on several nodes, each node's own launch flags, --nnodes and the rendezvous, go before the script again)
    return shlex.join([*launcher, sys.argv[0], *flags, "--resume"])


again = continue_command()
only_beside = args.resume and baseline.finished(args.out) and side is not None and not baseline.finished(side.folder)
if side is not None and folder_in_use(side.folder):  # a baseline of an earlier start still saving, or orphaned
    raise UserError(f"the baseline beside this run still runs in '{side.folder}' (a process of an earlier start); "
                    f"wait until it ends (its log: {side.folder}.log), then run this command again")
ckpt = (None if only_beside else  # the checkpoint on --resume; under torchrun the first process holds the folder
        open_run_folder(args.out, args.resume, args.overwrite, hold=master))
if ckpt is not None:
    ignored = {"out", "resume", "overwrite", "save_every", "eval_batch_size", "device", "log", "baseline", "compile",
               "command"}
    # a flag newer than the checkpoint was at its default there
    saved = lambda k: ckpt["config"].get(k, parser.get_default(k))
    differ = sorted(k for k in config if k not in ignored and saved(k) != config[k])
    if differ:
        was = ", ".join(f"{k}={saved(k)!r}" for k in differ)
        raise UserError(f"--resume with settings that differ from the checkpoint's ({was}); pass the same flags")
    for k in range(len(ckpt["stages"])):  # the evaluated images the structure metrics compare against
        load_file(os.path.join(args.out, "samples", f"stage{k}.pt"),
                  lambda x: x.dtype == torch.uint8 and x.dim() == 4 and len(x) == args.eval_n)


stop_requested = False  # Ctrl-C or SIGTERM seen
if side is not None:  # the baseline trains beside us (or did): half the cores each, from the start and on every
    torch.set_num_threads(baseline.THREADS)  # resume, so that every number is the same as with that many alone
if only_beside:  # this run is finished and its baseline was stopped: continue the baseline alone
    side.start()
    signal.signal(signal.SIGINT, lambda signum, frame: side.signal(signum))
    signal.signal(signal.SIGTERM, lambda signum, frame: side.signal(signum))
    sys.exit(side.finish(open(os.path.join(args.out, "results.md")).read(), False, again, args.method))

# -----------------------------------------------------------------------------
# Processes and devices: one process per GPU under torchrun, joined here.

if args.batch_size % (world * args.grad_accum):
    raise UserError(f"--batch_size {args.batch_size} must be divisible by processes x grad_accum = "
                    f"{world * args.grad_accum}")
micro = args.batch_size // (world * args.grad_accum)  # images per micro-batch on one process
device, dtype = pick_device_dtype(args.device, args.dtype)
if world > 1:
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # A timeout on every collective: if one process dies, the others fail after it instead of waiting forever.
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=DIST_TIMEOUT)

# -----------------------------------------------------------------------------
# Models: the frozen SD pipeline and the task rewards (loaded once, in the compute dtype).

t_load = time.time()
pipe = load_pipeline(args.model, device, dtype)
height, width = image_size(pipe, args.height, args.width)
if any(name not in WEIGHT_FREE for name in tasks):
    hub_unreachable()  # no network: fail at once (or read the cache) instead of retrying for half a minute
rewards = {}
for name in dict.fromkeys(tasks):
    try:
        rewards[name] = load_reward(name, reward_paths.get(name), device, dtype)
    except ValueError as e:
        raise UserError(str(e))
eval_prompts, eval_seeds = eval_set(args.model, args.eval_n)
if args.cache_prompts:  # every prompt this run will use, encoded once; the text encoders leave
    cache_prompts(pipe, train_prompts + eval_prompts, (height, width))
if args.compile:  # the hot function only, as gpt-fast does; each adapter set and batch shape compiles once
    pipe.denoiser.compile()
load_seconds = round(time.time() - t_load, 1)  # the model and the rewards
S, K, T = args.ddim_steps, args.grad_steps, len(tasks)
rid, soup, joint = args.method == "rid", args.method == "soup", args.method == "joint"
P, ITERS = (1, T * args.iters) if joint else (T, args.iters)  # training phases (joint: one, on all tasks), their steps
# fp16 (GPUs without bf16): a gradient scaler keeps the small reward gradients (x ~0.01 per DDIM step at K = 1) from
# underflowing in the fp16 backward; it skips a step whose scaled gradients overflow and lowers its scale.
# Its first scale is 2^10 (torch's default 2^16 overflows at once on a unit-sized reward loss); our choice.
scaler = torch.amp.GradScaler(device.split(":")[0], init_scale=2.0 ** 10, enabled=dtype == torch.float16)
if master:
    print(f"{T} tasks: {(' + ' if joint else ' -> ').join(tasks)} | method {args.method} | {world} process(es) x "
          f"{args.grad_accum} micro-batches x {micro} images = {args.batch_size} images per step | {height}x{width} px, "
          f"{S} DDIM steps, K={K}{' (random)' if args.random_grad_steps else ''}, {dtype} on {device}"
          f"{' with a loss scaler' if scaler.is_enabled() else ''} | {pipe.family}")
assert micro >= 1 and micro * world * args.grad_accum == args.batch_size
unet_calls = unet_calls_per_step(S, K, rid, not args.no_checkpointing, args.rid_trajectory)  # per image and step
if master:
    print(f"UNet calls per image and step: {unet_calls['forward']} forward and {unet_calls['backward']} backward "
          f"passes ({S - K} without grad; grad window re-run in backward: {'no' if args.no_checkpointing else 'yes'})")

# Everything loaded: only now may files appear.
if master:
    if args.overwrite and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(os.path.join(args.out, "adapters"), exist_ok=True)
    hold_folder(args.out)  # a new (or remade) folder: ours until this process ends
    write_json(os.path.join(args.out, "config.json"), config)

# -----------------------------------------------------------------------------
# Helpers for the loop: adapter names, per-step randomness, one stage's evaluation, checkpoint, what the tracker
# gets after a task, the all-reduce of a step, the optimiser step's non-finite guard.

def adapter_name(t):
    return {"naive": "lora", "joint": "joint"}.get(args.method, f"task{t + 1}")  # naive: one adapter through all tasks


def adapter_dir(t):  # relative to the run folder
    return "adapters/joint" if joint else f"adapters/task{t + 1}_{tasks[t]}"


def phase_name(t):  # what phase t trains on
    return "+".join(tasks) if joint else tasks[t]


def stage_adapters(t):  # adapter folders active after phase t (t = -1: the base model), and their weights
    one = args.method in ("naive", "joint")  # one adapter, saved after each phase
    folders = [] if t < 0 else [adapter_dir(t)] if one else [adapter_dir(j) for j in range(t + 1)]
    return folders, [args.soup_weight if soup else 1.0] * len(folders)


def step_randomness(t, step):
    """Prompts, initial latents, K and RID's extra matched steps (--rid_trajectory) of one optimiser step, for the
    GLOBAL batch: a function of (seed, task, step) only, so every process count and every resume sees the same data."""
    g = torch.Generator().manual_seed(seed_for("train", args.seed, t, step))
    idx = torch.randint(len(train_prompts), (args.batch_size,), generator=g).tolist()
    latents = initial_latents(pipe, args.batch_size, g, height, width)  # (B, 4, h, w)
    k = int(torch.randint(1, K + 1, (1,), generator=g)) if args.random_grad_steps else K
    extra = sorted(torch.randperm(S - k, generator=g)[:args.rid_trajectory].tolist()) if args.rid_trajectory else []
    return [train_prompts[i] for i in idx], latents, k, extra


def stage_images(stage):  # (N, 3, H, W) in [0, 1]: the evaluation images of a stage, as its PNGs hold them
    return torch.load(os.path.join(args.out, "samples", f"stage{stage}.pt"), weights_only=True).float() / 255


def run_eval(stage):
    """Evaluate the current model (every process samples its share of the set) and save its images (rank 0)."""
    base = stage_images(0) if stage > 0 and master else None  # the saved pixels, so a resumed run compares the same
    t0 = time.time()
    out = evaluate(pipe, rewards, eval_prompts, eval_seeds, S, args.guidance_scale, args.eta, args.eval_batch_size,
                   height=height, width=width, base_images=base, toy=is_toy(args.model),
                   clip_model=clip_at_hand(rewards), rank=rank, world=world, progress=master)
    images, out["seconds"] = out.pop("images"), round(time.time() - t0, 1)
    if master:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        with atomic_file(os.path.join(args.out, "samples", f"stage{stage}.pt")) as tmp:
            torch.save(to_uint8(images), tmp)  # uint8: 4x smaller, and what the PNGs hold
        with atomic_dir(os.path.join(args.out, "samples", f"stage{stage}")) as tmp:
            for k, image in enumerate(images):
                to_pil(image).save(os.path.join(tmp, f"{k:03d}.png"))
    return out


def save_checkpoint(t, step):
    """One self-describing file: config, position, every adapter, the EMA teacher, the optimiser, the results so
    far. Written to a temporary name and renamed, so a kill leaves the previous checkpoint intact."""
    state = {"config": config, "task": t, "step": step, "stages": stages, "train": train_log,
             "reward_scales": reward_scales, "nonfinite_run": nonfinite_run, "tracker_id": tracker.id,
             "adapters": {n: {k: p.detach().cpu() for k, p in lora_params(pipe.denoiser, n).items()}
                          for n in adapters_made},
             "ema": None if ema is None else {k: v.cpu() for k, v in ema.items()},
             "optimizer": None if optimizer is None else optimizer.state_dict(), "scaler": scaler.state_dict()}
    assert all(torch.isfinite(v).all() for a in state["adapters"].values() for v in a.values())
    with atomic_file(ckpt_path) as tmp:
        torch.save(state, tmp)


def track_stage(t):
    """After phase t (t+1 stages evaluated): the results of the tasks so far, to the tracker."""
    names, step = (tasks if joint else tasks[:t + 1]), (t + 1) * ITERS
    matrix = [[s["rewards"][r]["mean"] for r in names] for s in stages]
    m = ril_metrics(matrix)
    values = {f"eval/after_task{t + 1}/{r}": matrix[-1][j] for j, r in enumerate(names)}
    values.update({f"eval/{k}": v["mean"] for k, v in stages[-1]["structure"].items()})
    values.update({"eval/forgetting": m["forgetting"][-1], "eval/average_gain": m["average"][-1]})
    tracker.scalars({k: v for k, v in values.items() if v is not None}, step)
    grid = draw_grid({"rewards": names, "method": args.method}, [stage_images(s) for s in range(t + 2)])
    tracker.image("eval/grid", grid, step)


def all_reduce(params, stats):
    """One all-reduce per optimiser step carries every LoRA gradient and the step's statistics, so all processes take
    the same decisions (skip a non-finite step, stop on Ctrl-C) at the same step. The gradients come back summed
    over processes into p.grad. -> (the summed statistics as floats, whether gradients and statistics are finite)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
    flat = torch.cat([g.flatten() for g in grads] + [stats.to(device=grads[0].device, dtype=grads[0].dtype)])
    if world > 1:
        dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params.values(), grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    return flat[offset:].tolist(), bool(torch.isfinite(flat).all())


def unscale_and_check(optimizer, params, reduced_finite, losses):
    """fp16's scaler undoes its scale (a no-op otherwise); then -> (finite, overflow). Finite losses with overflowing
    gradients mean the scale is too high: the scaler halves it and the step is skipped, as torch's scaler does,
    without counting towards MAX_NONFINITE."""
    scaler.unscale_(optimizer)
    finite = reduced_finite and all(torch.isfinite(p.grad).all() for p in params.values())
    losses_finite = all(v == v and abs(v) != float("inf") for v in losses)
    return finite, scaler.is_enabled() and not finite and losses_finite


def log_step(bar, task_log, t, step, finite, row):
    """One optimiser step's figures: the progress bar, a line of log.jsonl, the tracker (rank 0)."""
    if master:
        bar.set_postfix(reward=f"{row['reward']:+.4f}", skipped=task_log["skipped"], s_per_step=f"{row['seconds']:.2f}")
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps({"task": t + 1, "step": step + 1, **row, "finite": finite}) + "\n")
        tracker.scalars({f"train/{k}": v for k, v in row.items() if v == v}, t * ITERS + step + 1)  # not NaN


def end_of_step(bar, t, done, stop):
    """After step `done` of task t: stop on a run of non-finite steps (one line), save a checkpoint every save_every
    steps, and on Ctrl-C or SIGTERM save, say how to resume and exit 130 (on every process at the same step)."""
    if nonfinite_run >= MAX_NONFINITE:
        if master:
            save_checkpoint(t, done)
        bar.close()
        raise UserError(f"stopped: {nonfinite_run} non-finite steps in a row (task {t + 1}, step {done}); lower --lr. "
                        f"The last finite weights are in {ckpt_path}")
    if master and (stop or (done % args.save_every == 0 and done < ITERS)):
        save_checkpoint(t, done)  # also at done == iters when stopping: the resume then finishes the task
    if stop:
        bar.close()
        if side is not None:
            side.wait()  # the baseline saves its checkpoint too
        if master:
            print(f"\ninterrupted: checkpoint saved at task {t + 1}, step {done}. Continue with:\n  {again}")
        tracker.close()
        if world > 1:
            dist.destroy_process_group()
        sys.exit(130)


# -----------------------------------------------------------------------------
# State: restored from the checkpoint on --resume, else fresh (the base model is evaluated first).

def trim_log(path, task, step):
    """On --resume: drop log.jsonl's rows after the checkpoint (task `task`, `step` steps done: up to save_every - 1
    steps that ran before the kill), which the resumed run logs again."""
    if os.path.isfile(path):
        with open(path) as f:
            lines = f.readlines()
        rows = [json.loads(line) for line in lines if line.endswith("\n")]  # not a line a kill cut short
        keep = [r for r in rows if (r["task"] - 1, r["step"]) <= (task, step)]
        if len(keep) < len(lines):
            write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


stages, train_log, adapters_made, reward_scales = [], [], [], []
ema, optimizer, start_task, start_step, nonfinite_run = None, None, 0, 0, 0
if ckpt is not None:
    stages, train_log, start_task, start_step = ckpt["stages"], ckpt["train"], ckpt["task"], ckpt["step"]
    reward_scales, nonfinite_run = ckpt["reward_scales"], ckpt["nonfinite_run"]
    scaler.load_state_dict(ckpt["scaler"])
    for name, state in ckpt["adapters"].items():
        add_lora(pipe.denoiser, name, args.lora_rank, args.lora_alpha)
        with torch.no_grad():
            for k, p in lora_params(pipe.denoiser, name).items():
                p.copy_(state[k])
        adapters_made.append(name)
    if master:
        print(f"resuming {args.out} at task {start_task + 1}, step {start_step}")
if master and args.resume:
    remove_partial_writes(args.out, os.path.join(args.out, "adapters"), os.path.join(args.out, "samples"))
    trim_log(os.path.join(args.out, "log.jsonl"), start_task, start_step)
tracker = Tracker(args.log if master else "none", args.out, config, ckpt.get("tracker_id") if ckpt else None,
                  start_task * ITERS + start_step + 1 if ckpt else None)  # the first step this process logs
if not stages:
    stages.append(baseline.adopt_stage0(args.out, master) if baseline.RUN_FOLDER else run_eval(0))
    if master:
        save_checkpoint(0, 0)
    if world > 1:
        dist.barrier()
if side is not None and not baseline.finished(side.folder):  # the baseline trains beside us from here on
    side.start()

# Ctrl-C or SIGTERM (a preempted job): finish the current step, save a checkpoint, exit. A second Ctrl-C kills.


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if side is not None:
        side.signal(signum)  # the baseline's process has its own session: it hears what we pass on


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

# -----------------------------------------------------------------------------
# Training: tasks one after another; within a task, DRaFT-K steps on the task's reward (+ the method's own term).

# The reward scales s_k: each reward's standard deviation over the base model's evaluation images (our choice), so
# that -r / s_k is about unit-sized for every reward. Measured once, from stage 0, and kept in the checkpoint.
for task in tasks[len(reward_scales):]:
    spread = stages[0]["scores"][task].float().std().item() if args.eval_n > 1 else 0.0
    reward_scales.append(1.0 if args.no_reward_norm or not spread > 0 else spread)

for t in range(start_task, P):
    name = adapter_name(t)
    # the phase's reward, divided by its scale: the task's own, or (joint) the mean of every task's
    reward_fn, scale = ((joint_reward([rewards[n] for n in tasks], reward_scales), 1.0) if joint else
                        (rewards[tasks[t]], 1.0 / reward_scales[t]))
    if name not in adapters_made:  # a new adapter starts with B = 0: the model is unchanged by adding it
        add_lora(pipe.denoiser, name, args.lora_rank, args.lora_alpha,  # its random A: a function of (seed, task)
                 seed=seed_for("lora", args.seed, t))
        adapters_made.append(name)
    # soup trains each adapter from the base model alone; the others keep earlier adapters active and frozen
    set_adapters(pipe.denoiser, [name] if soup else adapters_made, trainable=name)
    params = lora_params(pipe.denoiser, name)  # {full name: fp32 parameter}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    assert sum(p.requires_grad for p in pipe.denoiser.parameters()) == len(params)
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.0)
    # EMA teacher (RID): a copy of the current adapter that trails it; with B = 0 at the start of a task it is
    # exactly the model after the previous task.
    ema = {k: p.detach().clone() for k, p in params.items()} if rid else None
    first = start_step if t == start_task else 0
    if ckpt is not None and t == start_task and start_step > 0:  # resumed inside this task
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema = {k: v.to(device) for k, v in ckpt["ema"].items()}
    if master and first == 0:
        scales = ", ".join(f"{n} {s:.4g}" for n, s in zip(tasks, reward_scales)) if joint else f"{reward_scales[t]:.4g}"
        print(f"{args.method if joint else 'task'} {t + 1}/{P}: {phase_name(t)} | adapter '{name}' | "
              f"{sum(p.numel() for p in params.values()):,} trainable parameters | reward scale s_k = {scales}")
    bar = tqdm(range(first, ITERS), initial=first, total=ITERS, disable=not master, dynamic_ncols=True,
               desc=f"{args.method if joint else 'task'} {t + 1} {phase_name(t)}")
    if len(train_log) <= t:
        train_log.append({"task": phase_name(t), "seconds": [], "skipped": 0})
    task_log = train_log[t]
    for step in bar:
        t0, global_step = time.time(), t * ITERS + step + 1
        if global_step == FAULT_SIGNAL_STEP:
            os.kill(os.getpid(), FAULT_SIGNAL)  # SIGTERM: the real handler runs; this step still finishes
        prompts, latents, k, extra = step_randomness(t, step)
        stats = torch.zeros(5, dtype=torch.float64)  # sums of rewards, loss_reward, loss_rid, loss_l2; stop flag
        for j in range(args.grad_accum):  # this process's share of the global batch, in micro-batches
            lo = (rank * args.grad_accum + j) * micro
            eta_noise = ([torch.Generator().manual_seed(seed_for("eta", args.seed, t, step, lo + i)) for i in range(micro)]
                         if args.eta > 0 else None)  # one generator per image of the global batch
            r, loss_rid = step_losses(pipe, reward_fn, prompts[lo:lo + micro], latents[lo:lo + micro].to(device), S,
                                      args.guidance_scale, args.eta, k, ema, not args.no_checkpointing,
                                      args.checkpoint_decode, args.checkpoint_reward, eta_noise, extra)  # r: (micro,)
            if global_step in FAULT_NAN_STEPS:
                r = r * float("nan")
            # The losses, side by side (losses.py). Each micro-batch adds its share of the global-batch mean, so the
            # summed gradient over micro-batches and processes is the gradient of the global-batch mean.
            loss_reward = -scale * r.sum() / args.batch_size  # -mean(r_k) / s_k
            loss_rid = loss_rid * micro / args.batch_size  # RID: matching the EMA teacher (0 for other methods)
            scaler.scale(loss_reward + args.rid_lambda * loss_rid).backward()
            stats[:3] += torch.tensor([r.detach().sum().item(), loss_reward.item(), loss_rid.item()])
        if args.method == "l2":  # once per step; each process adds 1/world of it, the all-reduce sums them
            loss_l2 = l2_pull(pipe.denoiser, name)
            scaler.scale(args.l2_weight * loss_l2 / world).backward()
            stats[3] = loss_l2.item() / world
        if baseline.parent_gone():  # we are a baseline and the run we train beside is gone: stop as on Ctrl-C
            stop_requested = True
        stats[4] = float(stop_requested)
        (reward_sum, loss_r, loss_d, loss_w, stop), reduced_finite = all_reduce(params, stats)
        finite, overflow = unscale_and_check(optimizer, params, reduced_finite, (reward_sum, loss_r, loss_d, loss_w))
        grad_norm = float("nan")
        if finite:
            nonfinite_run = 0
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params.values(), args.max_grad_norm or float("inf")))
            scaler.step(optimizer)
            if ema is not None:  # the EMA teacher, right after the optimiser step: A_ema <- m A_ema + (1 - m) A
                ema_update(ema, params, args.ema_momentum)
        else:  # a NaN or inf anywhere: skip this step entirely, the weights stay as they were
            nonfinite_run += 0 if overflow else 1
            task_log["skipped"] += 1
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - t0
        task_log["seconds"].append(round(seconds, 4))
        log_step(bar, task_log, t, step, finite, {"reward": reward_sum / args.batch_size, "loss_reward": loss_r,
                                                  "loss_rid": loss_d, "loss_l2": loss_w, "grad_norm": grad_norm,
                                                  "seconds": round(seconds, 4)})
        if side is not None:
            side.poll()  # the baseline's bar
        end_of_step(bar, t, step + 1, stop)
    bar.close()
    # Task done: its adapter (diffusers LoRA format), then the evaluation of every reward, then a checkpoint.
    if master:
        with atomic_dir(os.path.join(args.out, adapter_dir(t))) as tmp:  # the whole folder at once, or none
            save_lora(pipe, name, tmp)
    if soup:  # the soup after task t: every adapter so far, each with weight c
        set_adapters(pipe.denoiser, adapters_made, weights=stage_adapters(t)[1])
    stages.append(run_eval(t + 1))
    ema, optimizer = None, None
    if master:
        save_checkpoint(t + 1, 0)
        track_stage(t)
    if world > 1:
        dist.barrier()

# -----------------------------------------------------------------------------
# Results: the reward matrix (rows: base, after each task; columns: rewards), forgetting, structure, pictures.

if master:
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # bytes (ru_maxrss is in KiB on Linux)
    results = {
        "model": args.model, "method": args.method, "rewards": tasks, "config": config, "image_size": [height, width],
        "matrix": [[s["rewards"][r]["mean"] for r in tasks] for s in stages],
        "matrix_se": [[s["rewards"][r]["se"] for r in tasks] for s in stages],
        "structure": [s["structure"] for s in stages],
        "adapters": [stage_adapters(t)[0] for t in range(-1, P)],
        "adapter_weights": [stage_adapters(t)[1] for t in range(-1, P)],
        "train": {"seconds_per_step": [sorted(l["seconds"])[len(l["seconds"]) // 2] for l in train_log],
                  "seconds_total": [round(sum(l["seconds"]), 1) for l in train_log],
                  "skipped_steps": [l["skipped"] for l in train_log], "reward_scales": reward_scales,
                  "unet_calls_per_image_step": unet_calls, "peak_memory_bytes": peak, "load_seconds": load_seconds,
                  "evaluation_seconds": [s.get("seconds") for s in stages]},
    }
    table = write_report(args.out, results, [stage_images(s) for s in range(P + 1)], [s["scores"] for s in stages])
    table += f"\nwrote {args.out}/results.json, results.md, grid.png, heatmap.png and {P} adapter{'s' * (P > 1)}\n"
    if side is None:
        print(table, end="")
tracker.close()
if world > 1:
    dist.destroy_process_group()
if master and side is not None:  # the baseline beside this run: both tables, then compare.png
    sys.exit(side.finish(table, stop_requested, again, args.method))
