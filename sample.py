"""
sample.py: the core of rid. Loads a Stable-Diffusion-format model (SD 1.x, 2.x or SDXL, read from the folder's
model_index.json), encodes prompts, runs the one DDIM sampler that training, evaluation and this CLI all use,
decodes to images in [0, 1], computes one training step's losses, and handles the LoRA adapters (add, freeze,
activate, save in diffusers' format, load back).

The sampler is differentiable: the last `grad_steps` (K) denoising steps keep their autograd graph (DRaFT-K /
AlignProp), each UNet call there under activation checkpointing, and the VAE decode keeps its graph too, so a
reward on the images can be backpropagated into LoRA weights.

Run it (offline, on the shipped toy model, a few seconds on a laptop CPU):
    python sample.py --model toy --prompt "a green triangle on a yellow background" --out out/green
Stable Diffusion 1.5 (or SDXL with --model stabilityai/stable-diffusion-xl-base-1.0) on a GPU, with an adapter:
    python sample.py --prompt "a photo of a cat" --prompt "a red bicycle" --out out/cats \
        --lora runs/rid/adapters/task1_aesthetic
Import it:
    from sample import load_pipeline, encode_prompts, encode_uncond, initial_latents, sample
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_model")
# LoRA on the attention projections of the UNet, as diffusers' own LoRA training examples do.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' save/load_lora_weights use
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_PARTS = SD_PARTS + ("text_encoder_2", "tokenizer_2")


class UserError(Exception):
    """A mistake in the user's input: the CLIs print its one-line message and exit with code 2."""


def one_line_errors(parser):
    """CLI setup, called by every script: a bad flag, or a UserError raised anywhere (also in a flat script's
    top-level code), ends the program with one line on stderr and exit code 2, no traceback. Library
    deprecation chatter and weight-loading bars are silenced so that such errors stay one line."""
    import warnings
    warnings.filterwarnings("ignore", module="(huggingface_hub|diffusers|transformers|peft)")
    # Environment, not the libraries' setters: importing diffusers costs a second we need not spend on bad input.
    for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the weight-loading bars of both libraries

    def error(message):
        print(f"error: {message} (see {parser.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def excepthook(kind, value, tb):
        if issubclass(kind, UserError):
            print(f"error: {value}", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(2)
        sys.__excepthook__(kind, value, tb)
    parser.error, sys.excepthook = error, excepthook
    return parser


def run_cli(main):
    """Run a CLI's main() (one_line_errors must have been called on its parser)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


SEED_STREAMS = ("eval", "train", "eta", "lora")
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


def check_seed(flag, seed):
    """A seed flag's value: any integer in [0, 2^64 - 1]; anything else gets one line."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{flag} must be an integer from 0 to 2^64 - 1 (got {seed})")
    return seed


def seed_for(stream, *ids):
    """The seed of one random draw, from its stream name and its ids (non-negative ints such as seed, task, step,
    image): a hash, so any user seed works and the same (stream, ids) always gives the same draw.
    torch's CPU generator (mt19937) uses only the low 32 bits of a seed (seeds s and s + 2^32 draw alike), so the
    seed is a 32-bit number: 30 bits of a BLAKE2b hash of (stream, ids) above 2 bits that hold the stream's index.
    Two streams therefore never share a seed, by construction: evaluation noise can never repeat a training draw,
    whatever the seeds. Within one stream two id tuples share a seed with chance about n^2 / 2^31 over n draws, which
    only repeats one batch's prompts and noise (our choice)."""
    import hashlib
    assert all(isinstance(i, int) and i >= 0 for i in ids), f"seed ids must be non-negative ints, got {ids}"
    digest = hashlib.blake2b(repr((stream, *ids)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 2 << 2 | SEED_STREAMS.index(stream)

# -----------------------------------------------------------------------------
# Loading: a Stable-Diffusion-format folder or hub id -> frozen UNet, VAE, text encoder(s), tokenizer(s)

@dataclass
class Pipe:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # a DDIMScheduler: we take its time grid and alphas_cumprod, never its step()
    text_encoder_2: torch.nn.Module = None  # SDXL only: CLIPTextModelWithProjection, gives the pooled embedding
    tokenizer_2: object = None
    zero_uncond: bool = False  # SDXL's force_zeros_for_empty_prompt: the unconditional branch is all zeros

    @property
    def xl(self):
        return self.text_encoder_2 is not None

    @property
    def vae_scale(self):  # 8 for SD: each latent pixel covers vae_scale x vae_scale image pixels
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size(self):  # default (height, width) in pixels, as diffusers derives it (sample_size: an int or [h, w])
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else s
        return h * self.vae_scale, w * self.vae_scale


def resolve_model(model):
    """'toy' names the model shipped in this repo; anything else is a hub id or a local folder."""
    return TOY_MODEL if model == "toy" else model


def check_model(model):
    """Cheap checks before loading anything: a local path must be an SD or SDXL folder."""
    path = resolve_model(model)
    looks_local = os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1
    if not looks_local:
        return  # a hub id "owner/name": only from_pretrained can tell whether it is reachable
    if not os.path.isdir(path):
        raise UserError(f"model folder '{model}' does not exist; pass a Stable Diffusion folder or a hub id")
    parts = XL_PARTS if os.path.isdir(os.path.join(path, "text_encoder_2")) else SD_PARTS
    missing = [p for p in ("model_index.json", *parts) if not os.path.exists(os.path.join(path, p))]
    if missing:
        raise UserError(f"'{model}' is not a Stable Diffusion folder (missing {', '.join(missing)}); "
                        f"pass a folder saved by StableDiffusionPipeline.save_pretrained or a hub id")


def hub_unreachable():
    """True when no hub can be asked: HF_HUB_OFFLINE is set, or (no proxy configured) the hub's host does not accept a
    TCP connection within 3 s. In the second case HF_HUB_OFFLINE=1 is set for this process, so every loader reads the
    local cache or fails at once, instead of retrying five times (about 28 s, a warning line per retry)."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # only the hub libraries know how to get through a proxy
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        if "huggingface_hub.constants" in sys.modules:  # read at import: set the imported value too
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
        return True


def model_error(model, err, local, offline):
    """The one line for a model that did not load: a damaged folder, an unreachable hub, a missing repository."""
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    chain, e = [], err  # diffusers and transformers wrap the hub's own errors in OSError: look at the causes
    while e is not None and len(chain) < 8:
        chain.append(type(e).__name__)
        e = e.__cause__ or e.__context__
    if local:
        return f"cannot load model folder '{model}' ({reason}); the folder is damaged: save or download it again"
    if offline:
        return (f"cannot load model '{model}': the hub cannot be reached from here (no network, or HF_HUB_OFFLINE=1) "
                f"and the model is not in the local cache; on a machine with network run `hf download {model}`, or "
                f"pass a local folder with --model DIR")
    if "RepositoryNotFoundError" in chain or "GatedRepoError" in chain:
        return (f"cannot load model '{model}': the hub has no repository '{model}' (removed, misspelt, or gated: "
                f"then `hf auth login`); pass another hub id or a local folder with --model DIR")
    return f"cannot load model '{model}' from the hub ({reason}); pass a local folder with --model DIR"


def load_pipeline(model=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """Load the parts of an SD or SDXL pipeline with the real from_pretrained code; all weights frozen, in `dtype`.
    The family comes from model_index.json: SDXL's lists a second text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    check_model(model)
    path = resolve_model(model)
    local = os.path.isdir(path)
    offline = not local and hub_unreachable()
    try:
        index = DiffusionPipeline.load_config(path)  # model_index.json (a few hundred bytes from the hub)
        xl = "text_encoder_2" in index
        part = lambda cls, name, **kw: cls.from_pretrained(path, subfolder=name, **kw)
        pipe = Pipe(
            unet=part(UNet2DConditionModel, "unet", torch_dtype=dtype),
            vae=part(AutoencoderKL, "vae", torch_dtype=dtype),
            text_encoder=part(CLIPTextModel, "text_encoder", dtype=dtype),
            tokenizer=part(CLIPTokenizer, "tokenizer"),
            # SD 1.5 ships a PNDM config and SDXL an Euler one; DDIM reads the same betas, offsets and spacing.
            scheduler=part(DDIMScheduler, "scheduler"),
            text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2", dtype=dtype) if xl else None,
            tokenizer_2=part(CLIPTokenizer, "tokenizer_2") if xl else None,
            zero_uncond=xl and index.get("force_zeros_for_empty_prompt", True))
    except (OSError, ValueError, SafetensorError) as e:  # a damaged weight file raises the last
        raise UserError(model_error(model, e, local, offline)) from None
    config = pipe.scheduler.config
    if config.thresholding:
        raise UserError(f"model '{model}': dynamic thresholding in the scheduler config is not supported")
    if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UserError(f"model '{model}': unknown prediction_type '{config.prediction_type}' in its scheduler config")
    if config.get("rescale_betas_zero_snr") and config.prediction_type == "epsilon":  # x_0 = (x_T - eps) / 0
        raise UserError(f"model '{model}': zero terminal SNR (rescale_betas_zero_snr) needs v_prediction or sample "
                        f"prediction; an epsilon model cannot predict x_0 at the first step")
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; its config asks for fp32, as diffusers does
    for net in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if net is not None:
            net.requires_grad_(False).eval().to(device)
    return pipe


# -----------------------------------------------------------------------------
# Prompts and noise. A "context" is the UNet's conditioning as its keyword arguments, B rows:
#   SD 1.x/2.x: {"encoder_hidden_states": (B, 77, D)}
#   SDXL:       the same with D = 768 + 1280, plus {"added_cond_kwargs": {"text_embeds": (B, 1280), "time_ids": (B, 6)}}

def tokenize(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(pipe, prompts, size=None):
    """The context of `prompts`, as diffusers' pipelines encode them. SD: the CLIP text embeddings, padded to 77
    tokens. SDXL: the penultimate hidden states of both text encoders side by side, the second one's pooled
    projection, and the time ids (original size, crop top-left, target size) of images of `size` (H, W)."""
    if not pipe.xl:
        ids = tokenize(pipe.tokenizer, prompts)
        return {"encoder_hidden_states": pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]}  # frozen: no graph
    hidden = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = encoder(tokenize(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    h, w = size or pipe.size
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=out[0].dtype, device=out[0].device).repeat(len(prompts), 1)
    return {"encoder_hidden_states": torch.cat(hidden, -1),
            "added_cond_kwargs": {"text_embeds": out[0], "time_ids": time_ids}}


def encode_uncond(pipe, n, size=None):
    """The unconditional branch of classifier-free guidance for n images: the context of "" (SD), or zeros where
    SDXL's config asks for them (force_zeros_for_empty_prompt), as diffusers does with no negative prompt."""
    context = encode_prompts(pipe, [""] * n, size)
    if pipe.zero_uncond:
        context["encoder_hidden_states"] = torch.zeros_like(context["encoder_hidden_states"])
        context["added_cond_kwargs"]["text_embeds"] = torch.zeros_like(context["added_cond_kwargs"]["text_embeds"])
    return context


def cat_context(*contexts):
    """Contexts stacked along the batch: cat_context(uncond, cond) feeds both guidance branches in one UNet call."""
    if isinstance(contexts[0], dict):
        return {k: cat_context(*[c[k] for c in contexts]) for k in contexts[0]}
    return torch.cat(contexts)


def initial_latents(pipe, n, generator, height=None, width=None):
    """x_T ~ N(0, I) (n, C, h, w). With generator=torch.Generator().manual_seed(seed) this is the same draw as
    diffusers' pipeline given that generator, so images can be compared one for one. Drawn on the CPU always,
    so a seed gives the same images on every device."""
    height, width = height or pipe.size[0], width or pipe.size[1]
    shape = (n, pipe.unet.config.in_channels, height // pipe.vae_scale, width // pipe.vae_scale)
    return torch.randn(shape, generator=generator) * pipe.scheduler.init_noise_sigma


def randn_like(x, generator):
    """Noise shaped like x (B, ...) from one generator, or from a list of B generators (one per image, so that an
    image's noise does not depend on its batch), drawn on the CPU."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in generator]).to(x.device)
    return torch.randn(x.shape, generator=generator).to(x.device)


# -----------------------------------------------------------------------------
# DDIM (Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models"), written out by hand

def ddim_schedule(scheduler, ddim_steps):
    """The time grid t_1 > ... > t_S and alpha-bar at t and at the previous (less noisy) grid point, taken
    from the model's own scheduler config (spacing, steps_offset, set_alpha_to_one) so we match diffusers."""
    scheduler.set_timesteps(ddim_steps)
    ts = scheduler.timesteps  # (S,) int64, descending
    abar = scheduler.alphas_cumprod  # (1000,) alpha-bar_t = prod(1 - beta)
    prev = ts - scheduler.config.num_train_timesteps // ddim_steps
    alpha_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    return ts, abar[ts], alpha_prev


def predict_x0_eps(out, x_t, alpha_t, prediction_type):
    """The UNet's output at x_t -> (x0_pred, eps), for the three prediction types, as DDIMScheduler.step computes
    them. Song et al. write alpha for what DDPM calls alpha-bar. v-prediction (Salimans and Ho 2022, SD 2.x 768 px)
    needs no division, so a zero-terminal-SNR schedule (alpha_t = 0 at the first step) stays finite."""
    a, b = alpha_t.sqrt(), (1 - alpha_t).sqrt()
    if prediction_type == "epsilon":
        return (x_t - b * out) / a, out  # eq. 12, "predicted x_0"
    if prediction_type == "v_prediction":  # v = sqrt(alpha) eps - sqrt(1 - alpha) x_0
        return a * x_t - b * out, a * out + b * x_t
    return out, (x_t - a * out) / b  # "sample": the model predicts x_0 itself


def ddim_step(x0_pred, eps, alpha_t, alpha_prev, eta=0.0, noise=None):
    """One DDIM update x_t -> x_{t-1} from the predicted x_0 and eps at x_t (predict_x0_eps)."""
    sigma = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()  # eq. 16
    x_prev = alpha_prev.sqrt() * x0_pred + (1 - alpha_prev - sigma**2).sqrt() * eps  # eq. 12, "direction to x_t"
    if eta > 0:
        x_prev = x_prev + sigma * noise  # eq. 12, random noise; eta = 1 is DDPM's ancestral sampler
    return x_prev


def unet_out(unet, x, t, context):
    """One UNet call in the compute dtype (that of the text embeddings: diffusers' `unet.dtype` walks every
    submodule, ~2 ms a call); the raw output (eps, v or x_0) comes back in fp32 for the DDIM arithmetic."""
    dtype = context["encoder_hidden_states"].dtype
    return unet(x.to(dtype), t, **context, return_dict=False)[0].float()


def decode(pipe, latents, checkpointing=False):
    """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1], differentiable unless the caller disables grad.
    checkpointing: recompute each decoder block in backward (diffusers' own per-block checkpointing); with K = 1
    the decoder's backward is the memory peak (docs/speed_and_memory.md)."""
    vae = pipe.vae
    if checkpointing:
        vae.enable_gradient_checkpointing()
    else:
        vae.disable_gradient_checkpointing()
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is not None and std is not None:  # some SDXL-family VAEs standardise each latent channel
        view = lambda v: torch.tensor(v, device=latents.device).view(1, -1, 1, 1)
        latents = latents * view(std) / vae.config.scaling_factor + view(mean)  # as StableDiffusionXLPipeline
    else:
        latents = latents / vae.config.scaling_factor
    x = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (x.float() / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1], as diffusers' image processor does


def sample(pipe, cond, uncond, latents, ddim_steps=50, guidance_scale=7.5, eta=0.0, grad_steps=0,
           checkpointing=True, checkpoint_decode=False, generator=None, capture=(), progress=False):
    """Guided DDIM from x_T = latents (B, C, h, w) to images (B, 3, H, W) in [0, 1].

    cond, uncond: contexts (encode_prompts, encode_uncond) of the prompts and of the unconditional branch.
    grad_steps:   K; only the last K steps (and the decode) build an autograd graph. 0: no graph at all.
    checkpointing: recompute each grad-window UNet call in backward instead of storing its activations.
    generator:    the noise source for eta > 0: one generator, or one per image (see randn_like).
    capture:      step indices i at which to return (t, x_t, UNet output); used by RID's teacher matching.
    Returns (images, captured) with captured = {i: (t, x_t, raw UNet output (2B or B, C, h, w))}; inside the grad
    window both keep their graph.
    """
    assert 0 <= grad_steps <= ddim_steps, f"grad_steps {grad_steps} must be in [0, ddim_steps={ddim_steps}]"
    ts, alphas, alphas_prev = ddim_schedule(pipe.scheduler, ddim_steps)
    guided = guidance_scale > 1.0  # as diffusers: guidance 1 means no unconditional branch at all
    context = cat_context(uncond, cond) if guided else cond  # 2B rows: one batched UNet call per step
    config = pipe.scheduler.config
    clip = config.clip_sample_range if config.clip_sample else None  # SD's configs: False
    x, captured = latents.float(), {}
    for i, t in enumerate(tqdm(ts, desc="ddim", leave=False, disable=not progress)):
        # The grad window: steps before the last K run with no graph, so memory does not grow with the
        # number of steps; inside it every step keeps its graph for the reward gradient (DRaFT-K).
        with torch.set_grad_enabled(i >= ddim_steps - grad_steps):
            x_in = torch.cat([x, x]) if guided else x
            if checkpointing and torch.is_grad_enabled():
                # Store only the UNet's inputs, re-run it during backward: memory per window step drops from
                # the UNet's activations (GBs for SD at 512 px) to one latent. use_reentrant=False is needed
                # because x_in of the first window step does not require grad.
                out = checkpoint(unet_out, pipe.unet, x_in, t, context, use_reentrant=False)
            else:
                out = unet_out(pipe.unet, x_in, t, context)
            if i in capture:
                captured[i] = (t, x, out)  # x keeps its graph inside the window (teacher_loss detaches it)
            out_uncond, out_cond = out.chunk(2) if guided else (out, out)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)  # classifier-free guidance, on the raw output
            x0_pred, eps = predict_x0_eps(out, x, alphas[i], config.prediction_type)
            if clip:
                x0_pred = x0_pred.clamp(-clip, clip)
            noise = randn_like(x, generator) if eta > 0 else None
            x = ddim_step(x0_pred, eps, alphas[i], alphas_prev[i], eta, noise)
    with torch.set_grad_enabled(grad_steps > 0):
        return decode(pipe, x, checkpoint_decode), captured


@torch.no_grad()
def generate(pipe, prompts, latents, ddim_steps=50, guidance_scale=7.5, eta=0.0, batch_size=8, generator=None,
             progress=True):
    """No-grad images (N, 3, H, W) in [0, 1] for N prompts and N initial latents, in batches.
    generator: per-step noise for eta > 0, one generator (the one that drew the latents, to match diffusers) or a
    list of N (one per image: then the images do not depend on batch_size)."""
    device, images = pipe.unet.device, []
    size = tuple(s * pipe.vae_scale for s in latents.shape[-2:])
    for b in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
        p = prompts[b:b + batch_size]
        g = generator[b:b + batch_size] if isinstance(generator, (list, tuple)) else generator
        x, _ = sample(pipe, encode_prompts(pipe, p, size), encode_uncond(pipe, len(p), size),
                      latents[b:b + batch_size].to(device), ddim_steps, guidance_scale, eta, generator=g)
        images.append(x.cpu())
    return torch.cat(images)


# -----------------------------------------------------------------------------
# One training step (train_rid.py and bench.py both call these): the losses of a micro-batch, RID's teacher term,
# the EMA update of the teacher, the L2 baseline's penalty.

def matched_steps(generator, ddim_steps, grad_steps, match_steps):
    """The step indices RID matches the teacher at: the K grad-window steps, plus M drawn from the rest of the
    trajectory (the no-grad part, whose x_t the sampler saves)."""
    extra = torch.randperm(ddim_steps - grad_steps, generator=generator)[:match_steps].tolist()
    return set(range(ddim_steps - grad_steps, ddim_steps)) | set(extra)


def step_losses(pipe, reward, prompts, latents, ddim_steps, guidance_scale=7.5, eta=0.0, grad_steps=1, teacher=None,
                matched=(), checkpointing=True, checkpoint_decode=False, checkpoint_reward=False, generator=None):
    """Forward half of a training step on one micro-batch: guided DDIM with the K-step grad window, decode, the
    reward, and (teacher given) RID's teacher-matching loss at the `matched` steps.
    The caller weights, sums and backpropagates. -> (rewards (B,) fp32 with graph, teacher loss (scalar; 0 without
    a teacher))."""
    size = tuple(s * pipe.vae_scale for s in latents.shape[-2:])
    cond, uncond = encode_prompts(pipe, prompts, size), encode_uncond(pipe, len(prompts), size)
    images, captured = sample(pipe, cond, uncond, latents, ddim_steps, guidance_scale, eta, grad_steps=grad_steps,
                              checkpointing=checkpointing, checkpoint_decode=checkpoint_decode, generator=generator,
                              capture=matched if teacher is not None else ())
    dtype = cond["encoder_hidden_states"].dtype
    if checkpoint_reward:  # store only the images; the reward network re-runs in backward
        r = checkpoint(reward, images.to(dtype), prompts, use_reentrant=False).float()
    else:
        r = reward(images.to(dtype), prompts).float()  # (B,)
    if teacher is None:
        return r, torch.zeros((), device=r.device)
    context = cat_context(uncond, cond) if guidance_scale > 1 else cond
    return r, teacher_loss(pipe, captured, context, teacher, checkpointing)


def teacher_loss(pipe, captured, context, teacher, checkpointing=True):
    """RID's momentum-distillation term (docs/method.md): the mean over matched steps of
    || eps_student(x_t, t, c) - stopgrad(eps_teacher(x_t, t, c)) ||^2, over both guidance branches. Our
    reconstruction; the paper names the teacher, not the loss.
    The error is measured on eps whatever the model predicts (our choice): both raw outputs are converted first, so a
    v-prediction model (SD 2.x) is matched on sqrt(abar_t) (v_student - v_teacher), not on v itself.
    x_t is data here, as the teacher sees it: the student's output is reused where x_t carries no graph (the first
    grad-window step), and recomputed on the detached x_t elsewhere (earlier steps, whose x_t the no-grad pass saved,
    and later window steps, whose x_t would otherwise pass the matching gradient back into the steps before them).
    captured: {i: (t, x_t, out)} from sample(capture=...); context: the (2B or B rows) context the sampler used.
    teacher:  {parameter name: tensor} that replace the current adapter's weights (its EMA) for the teacher,
      through torch.func.functional_call: no adapter switch, so checkpointed recomputes stay correct."""
    from torch.func import functional_call
    losses, abar, kind = [], pipe.scheduler.alphas_cumprod, pipe.scheduler.config.prediction_type
    guided = context["encoder_hidden_states"].shape[0] == 2 * next(iter(captured.values()))[1].shape[0]
    for t, x, out in captured.values():
        x_in = torch.cat([x, x]).detach() if guided else x.detach()
        if x.requires_grad or not out.requires_grad:  # one more student forward, with grad, at the detached x_t
            out = (checkpoint(unet_out, pipe.unet, x_in, t, context, use_reentrant=False) if checkpointing
                   else unet_out(pipe.unet, x_in, t, context))
        with torch.no_grad():  # the teacher costs one no-grad UNet forward per matched step, nothing more
            target = functional_call(pipe.unet, teacher, (x_in.to(context["encoder_hidden_states"].dtype), t),
                                     {**context, "return_dict": False})[0].float()
        eps_student = predict_x0_eps(out, x_in, abar[t], kind)[1]
        eps_teacher = predict_x0_eps(target, x_in, abar[t], kind)[1]
        losses.append((eps_student - eps_teacher).pow(2).mean())
    return torch.stack(losses).mean()


def ema_update(ema, params, momentum):
    """RID's EMA teacher, right after optimizer.step(): A_bar <- m * A_bar + (1 - m) * A, in place, for every
    tensor of the current adapter. It runs over the LoRA factors A and B, not their product B A (our choice, not
    in the paper: it costs two small tensors per layer; an EMA of the factors is not the EMA of the product, but
    both start at the model after the previous task and follow the student as m shrinks)."""
    torch._foreach_lerp_(list(ema.values()), [p.detach() for p in params.values()], 1 - momentum)


def lora_delta_sq(unet, name):
    """The `l2` baseline's penalty: sum over layers of || (alpha / r) B A ||_F^2, the squared Frobenius norm of the
    weight change adapter `name` makes (0 = the model after the previous task). Computed through the r x r
    products trace((B^T B)(A A^T)), never the full matrix."""
    params, total = lora_params(unet, name), 0.0
    for k, a in params.items():
        if ".lora_A." not in k:
            continue
        b = params[k.replace(".lora_A.", ".lora_B.")]  # A (r, in) or conv (r, in, kh, kw); B (out, r)
        a, b = a.flatten(1), b.flatten(1)
        module = unet.get_submodule(k.rsplit(".lora_A.", 1)[0])
        scale = module.scaling[name]
        total = total + scale ** 2 * ((b.T @ b) * (a @ a.T)).sum()
    return total


# -----------------------------------------------------------------------------
# LoRA adapters: one per task, on top of diffusers' peft integration

def add_lora(unet, name, rank=4, alpha=4.0):
    """Add a new LoRA adapter called `name` (B = 0, so the model is unchanged) and return its config."""
    from peft import LoraConfig
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    unet.add_adapter(config, adapter_name=name)
    for p in lora_params(unet, name).values():
        p.data = p.data.float()  # trainable weights in fp32 even when the UNet runs in bf16 (peft casts inputs)
    return config


def lora_params(unet, name):
    """The parameters of one adapter, by their full module path (what torch.func.functional_call expects)."""
    return {k: p for k, p in unet.named_parameters() if ".lora_" in k and k.split(".")[-2] == name}


def set_adapters(unet, names, trainable=None, weights=None):
    """Make exactly `names` active (their LoRA deltas summed, W0 + w_1 A_1 + ... + w_t A_t; weights default 1) and
    only `trainable` trainable. diffusers' set_adapters marks every active adapter trainable again: re-freeze."""
    unet.set_adapters(list(names), weights=list(weights) if weights is not None else None)
    for k, p in unet.named_parameters():
        p.requires_grad_(".lora_" in k and k.split(".")[-2] == trainable)


def save_lora(unet, name, config, out_dir, xl=False):
    """Save one adapter in diffusers' LoRA format (loadable by pipe.load_lora_weights), atomically.
    The config goes in as metadata: without it diffusers assumes lora_alpha = rank."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    state = get_peft_model_state_dict(unet, adapter_name=name)
    state = convert_state_dict_to_diffusers({k: v.detach().float().cpu().contiguous() for k, v in state.items()})
    with atomic_dir(out_dir) as tmp:
        (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(
            tmp, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict())


def check_lora(path):
    if not os.path.isfile(os.path.join(path, LORA_WEIGHTS)):
        raise UserError(f"'{path}' is not a diffusers LoRA folder (no {LORA_WEIGHTS}); "
                        f"pass a folder written by train_rid.py or save_lora_weights")


def load_lora(unet, path, name):
    """Load an adapter saved by save_lora (or any diffusers SD LoRA folder) under the name `name`, frozen. A file
    that is damaged, or holds no LoRA for this UNet, gets one line (UserError)."""
    from safetensors import SafetensorError
    check_lora(path)
    file = os.path.join(path, LORA_WEIGHTS)
    try:
        unet.load_lora_adapter(path, prefix="unet", adapter_name=name, weight_name=LORA_WEIGHTS)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"'{file}' cannot be loaded as a LoRA of this model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); pass an adapter folder written for this model") from None
    params = lora_params(unet, name)
    if not params:  # diffusers only warns when no key matches the UNet
        raise UserError(f"'{file}' holds no LoRA weights for this model's UNet; pass an adapter written for it")
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(False)


# -----------------------------------------------------------------------------
# Files: every write goes to a temporary name first and is renamed into place, so a kill at any moment
# leaves either the old file or the new one, never half of one.

@contextlib.contextmanager
def atomic_file(path):
    """with atomic_file(p) as tmp: write tmp; on success tmp replaces p in one rename (os.replace)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """with atomic_dir(d) as tmp: fill folder tmp; on success it becomes d (an old d is swapped out, then removed)."""
    path = path.rstrip("/")
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_json(path, data):
    with atomic_file(path) as tmp, open(tmp, "w") as f:  # closed, then renamed
        json.dump(data, f, indent=1)
        f.write("\n")


def to_pil(image):
    """(3, H, W) in [0, 1] -> PIL image, rounded as diffusers' numpy_to_pil does."""
    from PIL import Image
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.cpu().numpy())


def image_grid(images, ncol=None, pad=2):
    """(N, 3, H, W) in [0, 1] -> one PIL image, ncol images per row, white padding."""
    n, _, h, w = images.shape
    ncol = ncol or min(n, 8)
    nrow = math.ceil(n / ncol)
    grid = torch.ones(3, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for k in range(n):
        r, c = divmod(k, ncol)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[k]
    return to_pil(grid)


def pick_device_dtype(device=None, dtype=None):
    """One place that decides precision: bf16 compute on a CUDA GPU that supports it, else fp16 there (trained with
    a loss scaler); fp32 on CPU; unless the user says otherwise."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None and device.startswith("cuda"):
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, getattr(torch, dtype or "float32")


# -----------------------------------------------------------------------------
# CLI: prompts in, DIR/000.png ... and DIR/grid.png out

def main():
    parser = one_line_errors(argparse.ArgumentParser(description="Sample images with rid's DDIM sampler."))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, SD/SDXL folder, or 'toy' (shipped model)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat the flag for more images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial latents of the whole batch, as "
                        "diffusers' generator takes it (0 to 2^64 - 1; torch's CPU generator reads its low 32 bits)")
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of DDIM denoising steps")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance; 1 = none")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic, 1 = DDPM-like")
    parser.add_argument("--lora", action="append", default=[], help="diffusers LoRA folder; repeat to stack adapters")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels; none = the model's default")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels; none = the model's default")
    parser.add_argument("--batch_size", type=int, default=8, help="images per UNet batch (memory, not results)")
    parser.add_argument("--device", default=None, help="cuda or cpu; none = cuda when available")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype; none = bfloat16 on cuda (float16 where unsupported), float32 on cpu")
    parser.add_argument("--out", required=True, help="output folder for 000.png, 001.png, ... and grid.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    args = parser.parse_args()
    # Validate everything before loading a model.
    if not args.prompt:
        raise UserError("no prompt given; pass at least one --prompt \"...\"")
    if args.ddim_steps < 1 or args.batch_size < 1:
        raise UserError("--ddim_steps and --batch_size must be at least 1")
    if not 0 <= args.eta <= 1 or args.guidance_scale < 0:
        raise UserError("--eta must be in [0, 1] and --guidance_scale at least 0")
    if any(v is not None and v < 1 for v in (args.height, args.width)):
        raise UserError("--height and --width must be positive numbers of pixels")
    check_seed("--seed", args.seed)
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UserError(f"output folder '{args.out}' is not empty; choose another --out or pass --overwrite")
    for path in args.lora:
        check_lora(path)
    check_model(args.model)
    device, dtype = pick_device_dtype(args.device, args.dtype)
    pipe = load_pipeline(args.model, device, dtype)
    for k, path in enumerate(args.lora):
        load_lora(pipe.unet, path, f"lora{k}")
    if args.lora:
        set_adapters(pipe.unet, [f"lora{k}" for k in range(len(args.lora))])
    height, width = args.height or pipe.size[0], args.width or pipe.size[1]
    if height % pipe.vae_scale or width % pipe.vae_scale:
        raise UserError(f"--height and --width must be multiples of {pipe.vae_scale} for this model")
    generator = torch.Generator().manual_seed(args.seed)  # latents first, then eta's noise: diffusers' order
    latents = initial_latents(pipe, len(args.prompt), generator, height, width)
    images = generate(pipe, args.prompt, latents, args.ddim_steps, args.guidance_scale, args.eta,
                      args.batch_size, generator)
    with atomic_dir(args.out) as tmp:  # the whole folder appears at once, or not at all
        for k, image in enumerate(images):
            to_pil(image).save(os.path.join(tmp, f"{k:03d}.png"))
        image_grid(images).save(os.path.join(tmp, "grid.png"))
    print(f"wrote {len(images)} images and grid.png to {args.out}")


if __name__ == "__main__":
    run_cli(main)
