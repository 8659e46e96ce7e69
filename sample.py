"""
sample.py: the sampler core of rid. Loads a model in diffusers' format (SD 1.x, 2.x, SDXL, SD 3.5 or FLUX.1, the
family read from the folder's model_index.json), or takes a stock diffusers pipeline (Pipe.from_diffusers), encodes
prompts, draws the initial noise, runs the one sampler that training, evaluation and this CLI all use (DDIM for the
UNet families, the flow-matching Euler sampler for SD 3.5 and FLUX.1), decodes to images in [0, 1], and handles
the LoRA adapters (add, freeze, activate, save in diffusers' format, load back). The losses of a training step live
in losses.py; this file and that one copy out alone (docs/method.md).

The sampler is differentiable: the last `grad_steps` (K) denoising steps keep their autograd graph (DRaFT-K /
AlignProp), the denoiser's blocks there under activation checkpointing, and the VAE decode keeps its graph too, so a
reward on the images can be backpropagated into LoRA weights.

Run it (offline, on the shipped toy model, a few seconds on a laptop CPU):
    python sample.py --model toy --prompt "a green triangle on a yellow background" --out out/green
Stable Diffusion 1.5 (or --model stabilityai/stable-diffusion-xl-base-1.0, stabilityai/stable-diffusion-3.5-medium,
black-forest-labs/FLUX.1-dev) on a GPU, with an adapter:
    python sample.py --prompt "a photo of a cat" --prompt "a red bicycle" --out out/cats \
        --lora runs/rid/adapters/task1_aesthetic
Import it:
    from sample import Pipe, load_pipeline, encode_prompts, encode_uncond, initial_latents, sample
    pipe = Pipe.from_diffusers(StableDiffusionPipeline.from_pretrained(...))   # or a pipeline you already have
"""
import functools
import os
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


class UserError(ValueError):
    """Bad input (a model, a size, an adapter file): the message is one line that names the problem and the fix. rid's
    scripts print that line and exit 2 (common.one_line_errors); a copy of this file raises it as a ValueError. It is
    defined here, and common.py takes it from here, so that this file and losses.py copy out alone."""


DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_model")
# LoRA on the attention projections, as diffusers' own LoRA training examples do (SD 3.5: the image and the text
# stream's projections of each joint attention block, as train_dreambooth_lora_sd3.py targets them).
# FLUX.1: the modules diffusers' FLUX LoRA example (train_dreambooth_lora_flux.py) targets by default, the joint blocks'
# attention and feed-forward layers of both streams (its single blocks' attn.to_q/k/v match too).
LORA_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"],
                "sd3": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
                "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                         "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                         "ff_context.net.2"]}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' save/load_lora_weights use
FLOW = ("sd3", "flux")  # the families sampled with the flow-matching Euler sampler instead of DDIM
# What a folder of each family holds, the denoiser's subfolder first
PARTS = {"sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
         "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
         "sd3": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
         "flux": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")}
# Sampling steps and guidance: SD 3's and FLUX.1's are their pipelines' defaults (FLUX.1's guidance is the distilled
# scale that dev takes as an input; schnell has no guidance input and ignores it; its model card samples 4 steps).
DEFAULTS = {"sd": (50, 7.5), "sdxl": (50, 7.5), "sd3": (28, 7.0), "flux": (28, 3.5)}

# -----------------------------------------------------------------------------
# Loading: a folder or hub id in diffusers' format -> frozen denoiser, VAE, text encoder(s), tokenizer(s)

def is_flux(denoiser_config):  # FLUX.1's transformer is the one whose config has guidance_embeds (SD 3's has not)
    return "guidance_embeds" in denoiser_config


@dataclass
class Pipe:
    family: str  # "sd" (1.x, 2.x), "sdxl", "sd3" (SD 3 and 3.5: flow matching) or "flux" (FLUX.1: flow, distilled)
    denoiser: torch.nn.Module  # the UNet2DConditionModel, SD 3's SD3Transformer2DModel or FLUX.1's transformer
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # DDIMScheduler or FlowMatchEulerDiscreteScheduler: we take its time grid, never its step()
    text_encoder_2: torch.nn.Module = None  # SDXL, SD 3: CLIPTextModelWithProjection, pooled; FLUX.1: T5
    tokenizer_2: object = None
    text_encoder_3: torch.nn.Module = None  # SD 3: T5 (optional: None gives zeros in its place, as diffusers does)
    tokenizer_3: object = None
    zero_uncond: bool = False  # SDXL's force_zeros_for_empty_prompt: the unconditional branch is all zeros
    prompt_cache: dict = None  # {(prompt, (H, W)): its context}, from cache_prompts, which drops the text encoders

    @classmethod
    def from_diffusers(cls, pipeline):
        """A stock diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, or
        another with the same parts) -> the Pipe the method needs, sharing the pipeline's modules: the family read from
        its parts; the denoiser, VAE and text encoders frozen (set_adapters then makes one adapter trainable; without
        this, every step would also build gradients for the VAE and the text encoders); for the UNet families a
        DDIMScheduler made from the pipeline's scheduler config (SD 1.5's hub folder ships PNDM, whose grid repeats a
        timestep and would take 11 updates for 10 steps); what the sampler cannot follow refused in one line."""
        from diffusers import DDIMScheduler
        parts, name = pipeline.components, type(pipeline).__name__
        family = ("flux" if is_flux(getattr(parts.get("transformer"), "config", {})) else
                  "sd3" if parts.get("transformer") is not None else "sdxl" if parts.get("text_encoder_2") else "sd")
        if family not in FLOW and not hasattr(parts["scheduler"], "alphas_cumprod"):
            raise UserError(f"{name}: its scheduler ({type(parts['scheduler']).__name__}) has no alpha-bar schedule "
                            f"for rid's DDIM sampler to follow; give the pipeline a DDPM-family scheduler")
        scheduler = parts["scheduler"] if family in FLOW else DDIMScheduler.from_config(parts["scheduler"].config)
        pipe = cls(family=family, denoiser=parts[PARTS[family][0]], vae=parts["vae"],
                   text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], scheduler=scheduler,
                   text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"),
                   text_encoder_3=parts.get("text_encoder_3"), tokenizer_3=parts.get("tokenizer_3"),
                   zero_uncond=family == "sdxl" and pipeline.config.get("force_zeros_for_empty_prompt", True))
        check_scheduler(pipe, name)
        return pipe.frozen()

    def frozen(self, device=None):
        """Every network frozen, in eval mode (and on `device`); a VAE in fp16 whose config asks for fp32 (SDXL's
        overflows in fp16: force_upcast) in fp32, as diffusers decodes it. -> self"""
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)
        for net in (self.denoiser, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            if net is not None:
                net.requires_grad_(False).eval().to(device)
        return self

    @property
    def xl(self):
        return self.family == "sdxl"

    @property
    def flow(self):  # sampled with the flow-matching Euler sampler instead of DDIM
        return self.family in FLOW

    @property
    def vae_scale(self):  # 8 for SD: each latent pixel covers vae_scale x vae_scale image pixels
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size(self):  # default (height, width) in pixels, as diffusers derives it (sample_size: an int or [h, w])
        s = self.denoiser.config.get("sample_size", 128)  # FLUX.1's config has none: its pipeline's default, 128
        h, w = (s, s) if isinstance(s, int) else s
        return h * self.vae_scale, w * self.vae_scale


def resolve_model(model):
    """'toy' names the model shipped in this repo; anything else is a hub id or a local folder."""
    return TOY_MODEL if model == "toy" else model


@functools.lru_cache(maxsize=None)
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


def model_load_error(model, err, local):
    """The one line for a model (a folder, or a hub id) that did not load: a damaged folder, an unreachable hub, a
    repository the hub does not have."""
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    chain, e = [], err  # diffusers and transformers wrap the hub's own errors in OSError: look at the causes
    while e is not None and len(chain) < 8:
        chain.append(type(e).__name__)
        e = e.__cause__ or e.__context__
    if local:
        return f"cannot load model folder '{model}' ({reason}); the folder is damaged: save or download it again"
    if hub_unreachable():
        return (f"cannot load model '{model}': the hub cannot be reached from here (no network, or HF_HUB_OFFLINE=1) "
                f"and the model is not in the local cache; on a machine with network run `hf download {model}`, or "
                f"pass a local folder with --model DIR")
    if "RepositoryNotFoundError" in chain or "GatedRepoError" in chain:
        return (f"cannot load model '{model}': the hub has no repository '{model}' (removed, misspelt, or gated: "
                f"then `hf auth login`); pass another hub id or a local folder with --model DIR")
    return f"cannot load model '{model}' from the hub ({reason}); pass a local folder with --model DIR"


def model_index(model):
    """-> (family, the model's model_index.json as a dict), before any weights load: a local folder's own file, or a
    few hundred bytes from the hub. family: "sd", "sdxl", "sd3" or "flux". One line (UserError) for a path that is not a
    folder of one of the families, and for a hub id that cannot be reached or does not exist."""
    from diffusers import DiffusionPipeline
    from safetensors import SafetensorError
    path = resolve_model(model)
    local = os.path.isdir(path)
    if model == "toy" and not local:  # a copy of this file, away from the repository
        raise UserError(f"'toy' names the toy model shipped beside sample.py in toy_model/, and there is none at "
                        f"{TOY_MODEL}; pass that folder's path, another model folder or a hub id")
    if not local and (os.path.exists(path) or path.startswith((".", "/", "~")) or path.endswith("/")
                      or path.count("/") != 1):  # a path, not a hub id (owner/name)
        raise UserError(f"model folder '{model}' does not exist; pass a model folder (SD, SDXL, SD 3 or FLUX.1, in "
                        f"diffusers' layout) or a hub id")
    not_sd = f"'{model}' is not a diffusers folder of SD, SDXL, SD 3 or FLUX.1 (missing %s); pass a folder saved by " \
             f"a diffusers pipeline's save_pretrained, or a hub id"
    if local and not os.path.isfile(os.path.join(path, "model_index.json")):  # name the parts its folders suggest
        guess = "sd3" if os.path.isdir(os.path.join(path, "transformer")) else (
            "sdxl" if os.path.isdir(os.path.join(path, "text_encoder_2")) else "sd")
        missing = [p for p in PARTS[guess] if not os.path.exists(os.path.join(path, p))]
        raise UserError(not_sd % ", ".join(["model_index.json", *missing]))
    if not local:
        hub_unreachable()  # no network: the loaders read the cache or fail at once, instead of retrying
    try:
        index = DiffusionPipeline.load_config(path)
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(model_load_error(model, e, local)) from None
    denoiser = (index.get("transformer") or [None, None])[1]  # ["diffusers", class name]
    family = ("flux" if denoiser == "FluxTransformer2DModel" else "sd3" if denoiser else
              "sdxl" if "text_encoder_2" in index else "sd")
    missing = [p for p in PARTS[family] if local and not os.path.exists(os.path.join(path, p))]
    if missing:
        raise UserError(not_sd % ", ".join(missing))
    return family, index


# The classes each family's parts load with: denoiser, text_encoder, text_encoder_2 and tokenizer_2 (none: not in the
# family), scheduler. SD 1.5 ships a PNDM config and SDXL an Euler one; DDIM reads the same betas, offsets and spacing.
CLASSES = {"sd": ("UNet2DConditionModel", "CLIPTextModel", None, None, "DDIMScheduler"),
           "sdxl": ("UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer",
                    "DDIMScheduler"),
           "sd3": ("SD3Transformer2DModel", "CLIPTextModelWithProjection", "CLIPTextModelWithProjection",
                   "CLIPTokenizer", "FlowMatchEulerDiscreteScheduler"),
           "flux": ("FluxTransformer2DModel", "CLIPTextModel", "T5EncoderModel", "T5TokenizerFast",
                    "FlowMatchEulerDiscreteScheduler")}


def load_pipeline(model=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """Load the parts of a pipeline with the real from_pretrained code; all weights frozen, in `dtype`."""
    import diffusers
    import transformers
    from safetensors import SafetensorError
    (family, index), path = model_index(model), resolve_model(model)
    part = lambda lib, cls, name, **kw: getattr(lib, cls).from_pretrained(path, subfolder=name, **kw)
    denoiser, encoder, encoder_2, tokenizer_2, scheduler = CLASSES[family]
    try:
        t5 = family == "sd3" and (index.get("text_encoder_3") or [None])[0] is not None  # [null, null]: saved without
        pipe = Pipe(
            family=family,
            denoiser=part(diffusers, denoiser, PARTS[family][0], torch_dtype=dtype),
            vae=part(diffusers, "AutoencoderKL", "vae", torch_dtype=dtype),
            text_encoder=part(transformers, encoder, "text_encoder", dtype=dtype),
            tokenizer=part(transformers, "CLIPTokenizer", "tokenizer"),
            scheduler=part(diffusers, scheduler, "scheduler"),
            text_encoder_2=part(transformers, encoder_2, "text_encoder_2", dtype=dtype) if encoder_2 else None,
            tokenizer_2=part(transformers, tokenizer_2, "tokenizer_2") if tokenizer_2 else None,
            text_encoder_3=part(transformers, "T5EncoderModel", "text_encoder_3", dtype=dtype) if t5 else None,
            tokenizer_3=part(transformers, "T5TokenizerFast", "tokenizer_3") if t5 else None,
            zero_uncond=family == "sdxl" and index.get("force_zeros_for_empty_prompt", True))
    except (OSError, ValueError, SafetensorError) as e:  # a damaged weight file raises the last
        raise UserError(model_load_error(model, e, os.path.isdir(path))) from None
    check_scheduler(pipe, f"model '{model}'")
    return pipe.frozen(device)


def check_scheduler(pipe, what):
    """What the sampler cannot follow gets one line: a flow model without FlowMatchEulerDiscreteScheduler's grid; a DDIM
    config with dynamic thresholding, an unknown prediction type, or zero terminal SNR with epsilon prediction."""
    config = pipe.scheduler.config
    if pipe.flow:
        if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise UserError(f"{what}: rid's flow sampler steps FlowMatchEulerDiscreteScheduler's grid, not "
                            f"{type(pipe.scheduler).__name__}'s; give the pipeline that scheduler")
        return
    if config.thresholding:
        raise UserError(f"{what}: dynamic thresholding in the scheduler config is not supported")
    if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UserError(f"{what}: unknown prediction_type '{config.prediction_type}' in its scheduler config")
    if config.get("rescale_betas_zero_snr") and config.prediction_type == "epsilon":
        raise UserError(f"{what}: zero terminal SNR (rescale_betas_zero_snr) needs v_prediction or sample "
                        f"prediction; an epsilon model cannot predict x_0 at the first step")  # x_0 = (z - eps) / 0


def check_eta(family, eta):
    """DDIM's noise is defined for the DDIM families only: the flow sampler (SD 3, FLUX.1) is deterministic (one line
    otherwise). family: model_index's (or Pipe.family), so a script can check before loading anything."""
    if family in FLOW and eta > 0:
        raise UserError(f"--eta {eta}: the flow-matching Euler sampler of SD 3 and FLUX.1 is deterministic; drop --eta "
                        f"(or pass 0)")


# -----------------------------------------------------------------------------
# Prompts and noise. A "context" is the denoiser's conditioning as its keyword arguments, B rows:
#   SD 1.x/2.x: {"encoder_hidden_states": (B, 77, D)}
#   SDXL:       the same with D = 768 + 1280, plus {"added_cond_kwargs": {"text_embeds": (B, 1280), "time_ids": (B, 6)}}
#   SD 3:       {"encoder_hidden_states": (B, 77 + 256, 4096), "pooled_projections": (B, 768 + 1280)}

def tokenize(tokenizer, prompts, max_length=None):
    return tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(pipe, prompts, size=None):
    """The context of `prompts`, as diffusers' pipelines encode them, on the denoiser's device (a text encoder may
    sit elsewhere, such as T5 on the CPU). SD: the CLIP text embeddings, padded to 77 tokens. SDXL: the penultimate
    hidden states of both text encoders side by side, the second one's pooled projection, and the time ids
    (original size, crop top-left, target size) of images of `size` (H, W). SD 3: both CLIPs' penultimate hidden
    states side by side, zero-padded to T5's width, then T5's 256 tokens (zeros without T5) after them; the two
    pooled projections side by side. FLUX.1: T5's hidden states (512 tokens for dev, 256 for schnell, as diffusers'
    FLUX docs run them) and CLIP's pooled output."""
    device = pipe.denoiser.device
    if pipe.prompt_cache is not None:  # every prompt encoded once (cache_prompts)
        key = tuple(size or pipe.size)
        missing = [p for p in prompts if (p, key) not in pipe.prompt_cache]
        if missing:  # the text encoders are gone: say which prompt was not encoded beforehand
            raise UserError(f"prompt {missing[0]!r} at {key[0]}x{key[1]} px was not encoded by cache_prompts; "
                            f"give cache_prompts every prompt (and size) the run will use")
        return context_to(cat_context(*[pipe.prompt_cache[(p, key)] for p in prompts]), device)
    if pipe.family == "sd":
        ids = tokenize(pipe.tokenizer, prompts)
        return {"encoder_hidden_states": pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].to(device)}
    if pipe.family == "flux":
        clip, t5 = pipe.text_encoder, pipe.text_encoder_2
        pooled = clip(tokenize(pipe.tokenizer, prompts).to(clip.device)).pooler_output  # (B, 768)
        hidden = t5(tokenize(pipe.tokenizer_2, prompts, flux_text_length(pipe)).to(t5.device))[0]  # (B, 512, 4096)
        return {"encoder_hidden_states": hidden.to(device), "pooled_projections": pooled.to(device)}
    hidden, pooled = [], []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        length = pipe.tokenizer.model_max_length if pipe.flow else None  # SD 3: both at the first one's length
        out = encoder(tokenize(tokenizer, prompts, length).to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2].to(device))
        pooled.append(out[0].to(device))
    if pipe.flow:
        if pipe.text_encoder_3 is not None:
            t5 = pipe.text_encoder_3(tokenize(pipe.tokenizer_3, prompts, 256).to(pipe.text_encoder_3.device))[0]
        else:
            t5 = hidden[0].new_zeros(len(prompts), 256, pipe.denoiser.config.joint_attention_dim)
        clip = torch.cat(hidden, -1)  # (B, 77, 768 + 1280)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(device)], -2),
                "pooled_projections": torch.cat(pooled, -1)}
    h, w = size or pipe.size
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pooled[1].dtype, device=device).repeat(len(prompts), 1)
    return {"encoder_hidden_states": torch.cat(hidden, -1),
            "added_cond_kwargs": {"text_embeds": pooled[1], "time_ids": time_ids}}


def flux_text_length(pipe):
    """FLUX.1's T5 tokens: 512 for dev (a guidance input), 256 for schnell."""
    return 512 if pipe.denoiser.config.guidance_embeds else 256


def encode_uncond(pipe, n, size=None):
    """The unconditional branch of classifier-free guidance for n images: the context of "" (SD, SD 3), or zeros
    where SDXL's config asks for them (force_zeros_for_empty_prompt), as diffusers does with no negative prompt.
    None for FLUX.1, which is guidance-distilled: one branch, the guidance scale an input of dev's transformer."""
    if pipe.family == "flux":
        return None
    context = encode_prompts(pipe, [""] * n, size)
    if pipe.zero_uncond:
        context["encoder_hidden_states"] = torch.zeros_like(context["encoder_hidden_states"])
        context["added_cond_kwargs"]["text_embeds"] = torch.zeros_like(context["added_cond_kwargs"]["text_embeds"])
    return context


def cache_prompts(pipe, prompts, size=None, store="cpu"):
    """Encode every prompt and "" once, each alone, keep their contexts (on `store`), and drop the text encoders:
    encode_prompts reads the cache from then on. A training run knows its prompts in advance, and the encoders' GPU
    memory is then free for the step (SD 3.5's T5-XXL: 8.9 GiB in bf16), as diffusers' SD 3 LoRA example frees it.
    size: the images' (H, W), which SDXL's time ids hold; none = the model's default. The encoders' memory is freed
    where nothing else holds them: a pipeline that Pipe.from_diffusers took them from still does (delete it too)."""
    assert pipe.prompt_cache is None, "cache_prompts once: the text encoders are gone after it"
    size, cache = tuple(size or pipe.size), {}
    with torch.no_grad():
        for p in tqdm(list(dict.fromkeys(["", *prompts])), desc="encoding prompts", leave=False):
            cache[(p, size)] = context_to(encode_prompts(pipe, [p], size), store)
    pipe.prompt_cache = cache
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None
    return pipe


def context_to(context, device):
    """A context (a dict of tensors, nested for SDXL) on `device`."""
    return {k: context_to(v, device) if isinstance(v, dict) else v.to(device) for k, v in context.items()}


def denoiser_context(pipe, cond, uncond, guidance_scale, n):
    """The context of each step's one denoiser call for n images: with classifier-free guidance both branches
    stacked (2n rows, the unconditional first; as diffusers, guidance 1 means no unconditional branch at all);
    FLUX.1 is guidance-distilled: one branch, with dev's guidance scale an input of its transformer (n,)."""
    if pipe.family == "flux":
        if not pipe.denoiser.config.guidance_embeds:  # schnell
            return cond
        guidance = torch.full((n,), float(guidance_scale), device=cond["encoder_hidden_states"].device)
        return {**cond, "guidance": guidance}
    return cat_context(uncond, cond) if guidance_scale > 1.0 else cond


def cat_context(*contexts):
    """Contexts stacked along the batch: cat_context(uncond, cond) feeds both guidance branches in one call."""
    if isinstance(contexts[0], dict):
        return {k: cat_context(*[c[k] for c in contexts]) for k in contexts[0]}
    return torch.cat(contexts)


def size_step(vae_config, denoiser_config):
    """Image sizes are multiples of this many pixels: the VAE's downscale (8 for SD), times the transformer's patch
    for SD 3 (2, so 16 for SD 3.5) or FLUX.1's 2 x 2 packing of latents into tokens (16), so that the latents split
    into whole patches."""
    patch = 2 if is_flux(denoiser_config) else denoiser_config.get("patch_size", 1)
    return 2 ** (len(vae_config["block_out_channels"]) - 1) * patch


def check_size(model, family, height=None, width=None):
    """--height and --width against the model's size step, from its config files alone, before any weights load
    (one line, with the nearest sizes that work, otherwise). family: model_index's."""
    if height is None and width is None:
        return
    import diffusers
    path = resolve_model(model)
    try:
        configs = [getattr(diffusers, cls).load_config(path, subfolder=name) for cls, name in (
            ("AutoencoderKL", "vae"), (CLASSES[family][0], PARTS[family][0]))]
    except (OSError, ValueError) as e:
        raise UserError(model_load_error(model, e, os.path.isdir(path))) from None
    step = size_step(*configs)
    sizes = [v for v in (height, width) if v is not None]
    if any(v % step for v in sizes):
        near = "; ".join(f"{v // step * step or step} or {v // step * step + step} for {v}" for v in sizes if v % step)
        raise UserError(f"--height and --width must be multiples of {step} px for this model (got "
                        f"{height or 'default'}x{width or 'default'}); try {near}")


def image_size(pipe, height=None, width=None):
    """(H, W) in pixels: the model's default where none is given; each a multiple of the model's size step."""
    h, w = height or pipe.size[0], width or pipe.size[1]
    step = size_step(pipe.vae.config, pipe.denoiser.config)
    if h % step or w % step:
        raise UserError(f"--height and --width must be multiples of {step} px for this model (got {h}x{w})")
    return h, w


def initial_latents(pipe, n, generator, height=None, width=None):
    """The initial noise z ~ N(0, I), (n, C, h, w). With generator=torch.Generator().manual_seed(seed) this is the
    same draw as diffusers' pipeline given that generator, so images can be compared one for one. Drawn on the CPU
    always, so a seed gives the same images on every device."""
    height, width = height or pipe.size[0], width or pipe.size[1]
    channels = pipe.denoiser.config.in_channels // (4 if pipe.family == "flux" else 1)  # FLUX.1: 2 x 2 packed
    shape = (n, channels, height // pipe.vae_scale, width // pipe.vae_scale)
    return torch.randn(shape, generator=generator) * getattr(pipe.scheduler, "init_noise_sigma", 1.0)


def randn_like(x, generator):
    """Noise shaped like x (B, ...) from one generator, or from a list of B generators (one per image, so that an
    image's noise does not depend on its batch), drawn on the CPU."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in generator]).to(x.device)
    return torch.randn(x.shape, generator=generator).to(x.device)


# -----------------------------------------------------------------------------
# DDIM (Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models"), written out by hand

def ddim_schedule(scheduler, ddim_steps, device="cpu"):
    """The time grid t_1 > ... > t_S, alpha-bar at each t and alpha-bar at the previous (less noisy) grid point,
    from the model's own scheduler config (spacing, steps_offset, set_alpha_to_one) so we match diffusers. All on
    `device`, the latents' and the denoiser's: diffusers moves a 1-D timestep to the sample's device for no model
    (and SD 3's time embedding moves none), so a grid left on the CPU stops a GPU run at its first denoiser call."""
    scheduler.set_timesteps(ddim_steps, device=device)
    ts = scheduler.timesteps  # (S,) int64, descending
    abar = scheduler.alphas_cumprod.to(device)  # (1000,) alpha-bar_t = prod(1 - beta)
    prev = ts - scheduler.config.num_train_timesteps // ddim_steps
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], scheduler.final_alpha_cumprod.to(device))
    return ts, abar[ts], abar_prev


def predict_x0_eps(out, x_t, abar_t, prediction_type):
    """The UNet's output at x_t -> (x0_pred, eps), for the three prediction types, as DDIMScheduler.step computes
    them. abar_t is alpha-bar at t, what Song et al. write alpha. v-prediction (Salimans and Ho 2022, SD 2.x 768 px)
    needs no division, so a zero-terminal-SNR schedule (abar_t = 0 at the first step) stays finite."""
    a, b = abar_t.sqrt(), (1 - abar_t).sqrt()
    if prediction_type == "epsilon":
        return (x_t - b * out) / a, out  # eq. 12, "predicted x_0"
    if prediction_type == "v_prediction":  # v = sqrt(alpha) eps - sqrt(1 - alpha) x_0
        return a * x_t - b * out, a * out + b * x_t
    return out, (x_t - a * out) / b  # "sample": the model predicts x_0 itself


def ddim_step(x0_pred, eps, abar_t, abar_prev, eta=0.0, noise=None):
    """One DDIM update x_t -> x_{t-1} from the predicted x_0 and eps at x_t (predict_x0_eps); abar: alpha-bar."""
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()  # eq. 16
    x_prev = abar_prev.sqrt() * x0_pred + (1 - abar_prev - sigma**2).sqrt() * eps  # eq. 12, "direction to x_t"
    if eta > 0:
        x_prev = x_prev + sigma * noise  # eq. 12, random noise; eta = 1 is DDPM's ancestral sampler
    return x_prev


def flow_schedule(pipe, steps, latents):
    """The flow families' grid: sigma_1 = 1 > ... > sigma_S, then 0, and the timesteps 1000 sigma, from the model's
    FlowMatchEulerDiscreteScheduler config (its shift; with use_dynamic_shifting, mu from the image's token count, as
    the pipelines compute it). FLUX.1's pipeline starts from sigmas linspace(1, 1/S, S) before the shift, SD 3's from
    the scheduler's own range. x_sigma = (1 - sigma) x_0 + sigma noise: the model predicts the velocity
    v = noise - x_0 (rectified flow; Esser et al. 2024)."""
    config, mu, flux = pipe.scheduler.config, None, pipe.family == "flux"
    patch = 2 if flux else pipe.denoiser.config.patch_size  # FLUX.1 packs 2 x 2 latents into a token
    if config.get("use_dynamic_shifting"):
        tokens = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
    if flux:
        import numpy as np
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=latents.device)
    else:
        pipe.scheduler.set_timesteps(steps, mu=mu, device=latents.device)
    return pipe.scheduler.timesteps, pipe.scheduler.sigmas  # (S,), (S + 1,), on the latents' device


def denoise(net, x, t, context, weights=None):
    """One call of the denoiser (UNet or MMDiT) in the compute dtype (that of the text embeddings: diffusers'
    `unet.dtype` walks every submodule, ~2 ms a call); the raw output (eps, v or x_0; SD 3, FLUX.1: the velocity)
    comes back in fp32 for the sampler's arithmetic, shaped like x (B, C, h, w). weights: {name: tensor} to call it
    with instead of its own parameters (RID's teacher, through torch.func.functional_call)."""
    kwargs = {"timestep": t.expand(len(x)), **context, "return_dict": False}
    x = x.to(context["encoder_hidden_states"].dtype)
    shape, flux = x.shape, is_flux(net.config)
    if flux:  # FLUX.1 takes 2 x 2 latent patches as tokens, their positions, and the time as a fraction (sigma)
        kwargs.update(flux_ids(x, context["encoder_hidden_states"]), timestep=kwargs["timestep"].to(x.dtype) / 1000)
        x = pack(x)  # (B, h w / 4, 4 C)
    if weights is None:
        out = net(x, **kwargs)[0]
    else:
        from torch.func import functional_call
        out = functional_call(net, weights, (x,), kwargs)[0]
    return (unpack(out, shape) if flux else out).float()


def pack(x):
    """(B, C, h, w) latents -> FLUX.1's tokens (B, h/2 * w/2, 4 C), each a 2 x 2 patch (FluxPipeline._pack_latents)."""
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(tokens, shape):
    """pack's inverse: (B, h/2 * w/2, 4 C) -> (B, C, h, w) = shape (FluxPipeline._unpack_latents)."""
    B, C, h, w = shape
    return tokens.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


def flux_ids(x, text):
    """FLUX.1's position ids: (h/2 * w/2, 3) for the image tokens, (row, column) in the last two places, and zeros
    (L, 3) for the text tokens, as FluxPipeline makes them."""
    h2, w2 = x.shape[-2] // 2, x.shape[-1] // 2
    ids = torch.zeros(h2, w2, 3, device=x.device, dtype=x.dtype)
    ids[..., 1] += torch.arange(h2, device=x.device, dtype=x.dtype)[:, None]
    ids[..., 2] += torch.arange(w2, device=x.device, dtype=x.dtype)[None, :]
    return {"img_ids": ids.reshape(h2 * w2, 3),
            "txt_ids": torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)}


def checkpoint_blocks(net, on):
    """Per-block activation checkpointing, diffusers' own (torch.utils.checkpoint, use_reentrant=False): while grad
    is enabled, each block of the denoiser or VAE keeps only its inputs and runs again in backward, so a call holds
    one block's activations at a time instead of all of them. Without grad it does nothing."""
    net.enable_gradient_checkpointing() if on else net.disable_gradient_checkpointing()


def decode(pipe, latents, checkpointing=False):
    """Latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [0, 1], differentiable unless the caller disables grad.
    checkpointing: recompute each decoder block in backward; with K = 1 the decoder's backward is SD 1.5's memory
    peak (docs/speed_and_memory.md)."""
    vae, config = pipe.vae, pipe.vae.config
    checkpoint_blocks(vae, checkpointing)
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:  # some SDXL-family VAEs
        view = lambda v: torch.tensor(v, device=latents.device).view(1, -1, 1, 1)  # standardise each channel
        latents = latents * view(config.latents_std) / config.scaling_factor + view(config.latents_mean)
    else:
        latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)  # SD 3's VAE is shifted
    x = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (x.float() / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1], as diffusers' image processor does


def sample(pipe, cond, uncond, latents, ddim_steps=50, guidance_scale=7.5, eta=0.0, grad_steps=0,
           checkpointing=True, checkpoint_decode=False, generator=None, capture=(), progress=False):
    """Guided sampling from the initial noise `latents` (B, C, h, w) to images (B, 3, H, W) in [0, 1]: DDIM, or for
    SD 3 and FLUX.1 the Euler steps of the flow ODE, with the same grad window.

    cond, uncond: contexts (encode_prompts, encode_uncond) of the prompts and of the unconditional branch.
    ddim_steps:   S, the number of denoising steps (DDIM or Euler).
    grad_steps:   K; only the last K steps (and the decode) build an autograd graph. 0: no graph at all.
    checkpointing: recompute the grad window's denoiser blocks in backward instead of storing their activations.
    generator:    the noise source for eta > 0: one generator, or one per image (see randn_like).
    capture:      step indices i at which to return (t, x_t, raw); used by RID's teacher matching.
    Returns (images, captured) with captured = {i: (t, x_t, raw)}: raw is the denoiser's own output before guidance,
    both branches stacked (2B rows, unconditional first; B rows without guidance), which RID's teacher is matched on;
    inside the grad window x_t and raw keep their graph.
    """
    assert 0 <= grad_steps <= ddim_steps, f"grad_steps {grad_steps} must be in [0, ddim_steps={ddim_steps}]"
    if pipe.flow:
        ts, sigmas = flow_schedule(pipe, ddim_steps, latents)
    else:
        ts, abar, abar_prev = ddim_schedule(pipe.scheduler, ddim_steps, latents.device)
        config = pipe.scheduler.config
        clip = config.clip_sample_range if config.clip_sample else None  # SD's configs: False
    # Checkpointing the grad window: each block of a window step's denoiser call keeps only its inputs and runs again
    # in backward, so the step holds one block's activations at a time, not the whole call's (SD 3.5 at 1024 px:
    # 33.7 -> 28.3 GiB at the peak, estimated; docs/speed_and_memory.md). The no-grad steps keep nothing either way.
    # It is set here, not as a checkpoint() call in the loop body: diffusers checkpoints inside the call, per block,
    # which a call-level checkpoint cannot (it would recompute, and hold, the whole call in backward).
    checkpoint_blocks(pipe.denoiser, checkpointing)
    context = denoiser_context(pipe, cond, uncond, guidance_scale, len(latents))
    guided = len(context["encoder_hidden_states"]) == 2 * len(latents)  # both branches in one batched call
    x, captured = latents.float(), {}
    for i, t in enumerate(tqdm(ts, desc="sampling steps", leave=False, disable=not progress)):
        # The grad window: steps before the last K run with no graph, so memory does not grow with the
        # number of steps; inside it every step keeps its graph for the reward gradient (DRaFT-K).
        with torch.set_grad_enabled(i >= ddim_steps - grad_steps):
            x_in = torch.cat([x, x]) if guided else x
            raw = denoise(pipe.denoiser, x_in, t, context)  # eps, v or x_0 of both branches; per-block checkpoints
            if i in capture:
                captured[i] = (t, x, raw)  # x keeps its graph inside the window (teacher_loss detaches it)
            raw_uncond, raw_cond = raw.chunk(2) if guided else (raw, raw)
            pred = raw_uncond + guidance_scale * (raw_cond - raw_uncond)  # classifier-free guidance, on the raw output
            if pipe.flow:  # Euler step of dx/dsigma = v, from sigma_i down to sigma_{i+1}
                x = x + (sigmas[i + 1] - sigmas[i]) * pred
                continue
            x0_pred, eps = predict_x0_eps(pred, x, abar[i], config.prediction_type)
            if clip:
                x0_pred = x0_pred.clamp(-clip, clip)
            noise = randn_like(x, generator) if eta > 0 else None
            x = ddim_step(x0_pred, eps, abar[i], abar_prev[i], eta, noise)
    with torch.set_grad_enabled(grad_steps > 0):
        return decode(pipe, x, checkpoint_decode), captured


@torch.no_grad()
def generate(pipe, prompts, latents, ddim_steps=50, guidance_scale=7.5, eta=0.0, batch_size=8, generator=None,
             progress=True):
    """No-grad images (N, 3, H, W) in [0, 1] for N prompts and N initial latents, in batches.
    generator: per-step noise for eta > 0, one generator (the one that drew the latents, to match diffusers) or a
    list of N (one per image: then the images do not depend on batch_size)."""
    device, images = pipe.denoiser.device, []
    size = tuple(s * pipe.vae_scale for s in latents.shape[-2:])
    for b in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
        p = prompts[b:b + batch_size]
        g = generator[b:b + batch_size] if isinstance(generator, (list, tuple)) else generator
        x, _ = sample(pipe, encode_prompts(pipe, p, size), encode_uncond(pipe, len(p), size),
                      latents[b:b + batch_size].to(device), ddim_steps, guidance_scale, eta, generator=g)
        images.append(x.cpu())
    return torch.cat(images)


# -----------------------------------------------------------------------------
# LoRA adapters: one per task, on top of diffusers' peft integration

def add_lora(net, name, rank=4, alpha=4.0, seed=None):
    """Add a new LoRA adapter called `name` to the denoiser (B = 0, so the model is unchanged); -> its config.
    The weight change is (alpha / rank) B A; A starts Gaussian (peft's "gaussian" init), drawn from `seed` on the CPU
    so that an adapter is the same on every run and device (none: torch's global generator, as peft draws it)."""
    from peft import LoraConfig
    targets = LORA_TARGETS["flux" if is_flux(net.config) else
                           "sd3" if hasattr(net.config, "joint_attention_dim") else "unet"]
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # the global generator is left as it was
        if seed is not None:
            torch.default_generator.manual_seed(seed)  # peft builds the A matrices on the CPU, then moves them
        net.add_adapter(config, adapter_name=name)
    net.to(net.device)  # the new adapter where the network is: peft leaves a second one on the CPU when the first
    for p in lora_params(net, name).values():  # sits on meta (the tests' stand-in for a GPU)
        p.data = p.data.float()  # trainable weights in fp32 even when the network runs in bf16 (peft casts inputs)
    return config


def lora_params(net, name):
    """The parameters of one adapter, by their full module path (what torch.func.functional_call expects)."""
    return {k: p for k, p in net.named_parameters() if ".lora_" in k and k.split(".")[-2] == name}


def set_adapters(net, names, trainable=None, weights=None):
    """Make exactly `names` active (their LoRA weight changes summed, W0 + w_1 dW_1 + ... + w_k dW_k; weights
    default 1) and only `trainable` trainable. diffusers' set_adapters marks every active adapter trainable again:
    re-freeze."""
    net.set_adapters(list(names), weights=list(weights) if weights is not None else None)
    for k, p in net.named_parameters():
        p.requires_grad_(".lora_" in k and k.split(".")[-2] == trainable)


def save_lora(pipe, name, out_dir):
    """Save one adapter of the denoiser in diffusers' LoRA format (what pipe.load_lora_weights reads) into out_dir
    (train_rid.py writes a temporary folder and renames it, so a kill leaves no half-written adapter). Its config goes
    in as metadata: without it diffusers assumes lora_alpha = rank. The UNet's keys go through
    convert_state_dict_to_diffusers, as diffusers' SD and SDXL LoRA examples save them; SD 3's stay in peft's names,
    as its SD 3 example saves them: converted (to_q/k/v/out renamed to the old lora.down/up names, the add_* keys
    left in peft's), the SD 3 loader reads the file as peft's and drops the renamed half with a warning."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    state = get_peft_model_state_dict(pipe.denoiser, adapter_name=name)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    metadata = pipe.denoiser.peft_config[name].to_dict()
    if pipe.flow:  # SD 3 and FLUX.1: peft's names, as diffusers' LoRA examples of both save them
        (diffusers.FluxPipeline if pipe.family == "flux" else diffusers.StableDiffusion3Pipeline).save_lora_weights(
            out_dir, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata)
    else:
        (diffusers.StableDiffusionXLPipeline if pipe.xl else diffusers.StableDiffusionPipeline).save_lora_weights(
            out_dir, unet_lora_layers=convert_state_dict_to_diffusers(state), unet_lora_adapter_metadata=metadata)


def check_lora(path):
    if not os.path.isfile(os.path.join(path, LORA_WEIGHTS)):
        raise UserError(f"'{path}' is not a diffusers LoRA folder (no {LORA_WEIGHTS}); "
                        f"pass a folder written by train_rid.py or save_lora_weights")


def load_lora(pipe, path, name):
    """Load an adapter saved by save_lora (or any diffusers LoRA folder of this family) under the name `name`,
    frozen. A file that is damaged, or holds no LoRA for this denoiser, gets one line (UserError)."""
    from safetensors import SafetensorError, safe_open
    check_lora(path)
    file, net, prefix = os.path.join(path, LORA_WEIGHTS), pipe.denoiser, PARTS[pipe.family][0]
    try:
        net.load_lora_adapter(path, prefix=prefix, adapter_name=name, weight_name=LORA_WEIGHTS)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"'{file}' cannot be loaded as a LoRA of this model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); pass an adapter folder written for this model") from None
    params = lora_params(net, name)
    with safe_open(file, "pt") as f:  # diffusers only warns when keys match no module: count what became a weight
        saved = sum(k.startswith(prefix + ".") for k in f.keys())
    if len(params) < saved or not params:
        raise UserError(f"'{file}' holds {saved} LoRA tensors for this model's denoiser, of which {len(params)} "
                        f"match it; pass an adapter written for this model")
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(False)


# -----------------------------------------------------------------------------
# CLI: prompts in, DIR/000.png ... and DIR/grid.png out

def main():
    import argparse
    from common import atomic_dir, check_seed, image_grid, one_line_errors, pick_device_dtype, to_pil  # CLI plumbing
    parser = one_line_errors(argparse.ArgumentParser(description="Sample images with rid's sampler."))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, SD/SDXL/SD 3 folder, or 'toy' (shipped model)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat the flag for more images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial latents of the whole batch, as "
                        "diffusers' generator takes it (0 to 2^64 - 1; torch's CPU generator reads its low 32 bits)")
    parser.add_argument("--ddim_steps", type=int, default=None, help="sampling steps (DDIM; SD 3, FLUX.1: Euler); none "
                        "= the family's default (50; SD 3, FLUX.1: 28)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance; 1 = none; "
                        "none = the family's default (7.5; SD 3: 7.0; FLUX.1: 3.5, an input of its transformer)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic, 1 = DDPM-like")
    parser.add_argument("--lora", action="append", default=[], help="diffusers LoRA folder; repeat to stack adapters")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels; none = the model's default")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels; none = the model's default")
    parser.add_argument("--batch_size", type=int, default=8, help="images per denoiser batch (memory, not results)")
    parser.add_argument("--device", default=None, help="cuda or cpu; none = cuda when available")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype; none = bfloat16 on cuda (float16 where unsupported), float32 on cpu")
    parser.add_argument("--out", required=True, help="output folder for 000.png, 001.png, ... and grid.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    args = parser.parse_args()
    # Validate everything before loading a model.
    if not args.prompt:
        raise UserError("no prompt given; pass at least one --prompt \"...\"")
    if (args.ddim_steps is not None and args.ddim_steps < 1) or args.batch_size < 1:
        raise UserError("--ddim_steps and --batch_size must be at least 1")
    if not 0 <= args.eta <= 1 or (args.guidance_scale or 0) < 0:
        raise UserError("--eta must be in [0, 1] and --guidance_scale at least 0")
    if any(v is not None and v < 1 for v in (args.height, args.width)):
        raise UserError("--height and --width must be positive numbers of pixels")
    check_seed("--seed", args.seed)
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UserError(f"output folder '{args.out}' is not empty; choose another --out or pass --overwrite")
    for path in args.lora:
        check_lora(path)
    family, _ = model_index(args.model)  # the model's own configs, a few hundred bytes, before any weights load
    check_eta(family, args.eta)
    check_size(args.model, family, args.height, args.width)
    device, dtype = pick_device_dtype(args.device, args.dtype)
    pipe = load_pipeline(args.model, device, dtype)
    steps, guidance = args.ddim_steps or DEFAULTS[family][0], args.guidance_scale
    guidance = DEFAULTS[family][1] if guidance is None else guidance
    for k, path in enumerate(args.lora):
        load_lora(pipe, path, f"lora{k}")
    if args.lora:
        set_adapters(pipe.denoiser, [f"lora{k}" for k in range(len(args.lora))])
    height, width = image_size(pipe, args.height, args.width)
    generator = torch.Generator().manual_seed(args.seed)  # latents first, then eta's noise: diffusers' order
    latents = initial_latents(pipe, len(args.prompt), generator, height, width)
    images = generate(pipe, args.prompt, latents, steps, guidance, args.eta, args.batch_size, generator)
    with atomic_dir(args.out) as tmp:  # the whole folder appears at once, or not at all
        for k, image in enumerate(images):
            to_pil(image).save(os.path.join(tmp, f"{k:03d}.png"))
        image_grid(images).save(os.path.join(tmp, "grid.png"))
    print(f"wrote {len(images)} images and grid.png to {args.out}")


if __name__ == "__main__":  # run as module `sample`: its UserError is the one common.py's one-line errors know
    __import__("sample").main()
