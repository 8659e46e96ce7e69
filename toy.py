"""
toy.py: the recipe of the toy world's model (toy_world.py holds the world itself: its images, captions, checker
and ground truths). A complete latent text-to-image model (AutoencoderKL + UNet2DConditionModel + a small
CLIPTextModel and CLIPTokenizer) pretrained on the world's images from scratch on a CPU, then its two learned rewards
(toyclip, toypref), and their measurement (docs/toy_world.md).

The model is saved as an ordinary diffusers StableDiffusionPipeline folder (DDIM scheduler config,
safetensors), so `from_pretrained(dir)` loads it like any hub model. The repo ships one in toy_model/.

    python toy.py --overwrite                 # remake the shipped toy_model/ (about 12 min on 2 CPU cores)
    python toy.py --out runs/toy              # same, into a fresh folder
    python toy.py --eval_only --out toy_model --grid assets/toy_samples.png   # measure a model

No other file imports this one. Everything in it is our own design; the paper has no toy world.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from common import UserError, atomic_dir, atomic_file, one_line_errors, to_pil
from sample import generate, initial_latents, load_pipeline
from toy_world import (FOLLOW, NAMES, SHAPES, SIZES, all_captions, bare, caption, classify, match_rates,
                       parse_caption, preference_truth, render, toy_captions)

# ---------------------------------------------------------------------------------------------------
# Flags. Parsed only under __main__, so that `import toy` (the tests) never reads argv.
parser = argparse.ArgumentParser(description="pretrain the toy text-to-image model, or evaluate one")
# I/O
parser.add_argument("--out", type=str, default="toy_model", help="output pipeline folder (refused if non-empty, see --overwrite)")
parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder once the new model is complete")
parser.add_argument("--eval_only", action="store_true", help="skip training; evaluate the model already in --out")
parser.add_argument("--grid", type=str, default="", help="also save a captioned sample grid PNG here ('' = none)")
parser.add_argument("--seed", type=int, default=0, help="seed of all training randomness (data, init, noise)")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = one per core)")
# autoencoder
parser.add_argument("--vae_steps", type=int, default=1000, help="AutoencoderKL optimiser steps")
parser.add_argument("--vae_batch", type=int, default=32, help="images per AutoencoderKL step")
parser.add_argument("--vae_lr", type=float, default=2e-3, help="peak AdamW learning rate of the autoencoder")
parser.add_argument("--vae_kl", type=float, default=1e-6, help="weight of the KL term (SD's value; keeps latents near-Gaussian)")
parser.add_argument("--scale_n", type=int, default=2048, help="fresh images on which the latent scale is measured")
# denoiser + text encoder
parser.add_argument("--unet_steps", type=int, default=1800, help="UNet + text encoder optimiser steps")
parser.add_argument("--unet_batch", type=int, default=64, help="images per UNet step")
parser.add_argument("--unet_lr", type=float, default=1e-3, help="peak AdamW learning rate of the UNet and text encoder")
parser.add_argument("--warmup", type=int, default=100, help="linear LR warmup steps (both stages), then cosine decay to 0")
parser.add_argument("--caption_dropout", type=float, default=0.1, help="fraction of captions replaced by '' (for classifier-free guidance)")
parser.add_argument("--bare", type=float, default=0.35, help="fraction of captions without their size (the shape then has "
                    "any size), so that captions without one stay valid prompts")
parser.add_argument("--log_every", type=int, default=100, help="print a loss line every this many steps")
# the learned toy rewards (toyclip, toypref), trained after the model or alone with --only_rewards
parser.add_argument("--only_rewards", action="store_true", help="train only the two learned rewards into --out (an "
                    "existing model folder), leaving the model as it is")
parser.add_argument("--reward_steps", type=int, default=800, help="optimiser steps of each learned reward")
parser.add_argument("--reward_batch", type=int, default=64, help="images per reward step (distinct captions)")
parser.add_argument("--reward_lr", type=float, default=2e-3, help="peak AdamW learning rate of the rewards")
# evaluation (the numbers in docs/toy_world.md)
parser.add_argument("--eval_n", type=int, default=256, help="held-out captions to sample and check (0 = skip)")
parser.add_argument("--eval_seed", type=int, default=1234, help="seed of the held-out captions and of the initial latents")
parser.add_argument("--ddim_steps", type=int, default=50, help="DDIM steps at evaluation")
parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale at evaluation (1 = none)")

def degrade(images, g):
    """What a generated image looks like next to a rendered one: edges blurred by a random amount, a little noise."""
    B = len(images)
    a = torch.rand(B, 1, 1, 1, generator=g) * 0.8
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noise = torch.randn(images.shape, generator=g) * torch.rand(B, 1, 1, 1, generator=g) * 0.04
    return ((1 - a) * images + a * blurred + noise).clamp(0, 1)

# ---------------------------------------------------------------------------------------------------
# Sampling a toy model for evaluation, and a captioned grid for humans.

def sample_toy(model, captions, seed, ddim_steps=50, guidance_scale=7.5):
    """-> images (B, 3, 32, 32) in [0, 1] from the project's one sampler (sample.py: hand-written DDIM,
    equal to diffusers' StableDiffusionPipeline + DDIMScheduler). Initial latents: one randn draw of the
    whole batch from torch.Generator().manual_seed(seed), as the diffusers pipeline would make them."""
    pipe = load_pipeline(model)
    latents = initial_latents(pipe, len(captions), torch.Generator().manual_seed(seed))  # (B, 4, 8, 8)
    with torch.no_grad():
        return generate(pipe, captions, latents, ddim_steps, guidance_scale, batch_size=64, progress=False)


def save_grid(images, captions, path, cols=6, scale=6):
    """Each image upscaled (nearest) by `scale`, its caption written under it."""
    from PIL import Image, ImageDraw
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h, text_h = 32 * scale, 32 * scale, 30
    grid = Image.new("RGB", (cols * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cell_w, (i // cols) * (cell_h + text_h)
        grid.paste(to_pil(img).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        c, s, b, z = parse_caption(cap)
        draw.text((x + 4, y + cell_h + 2), f"{z + ' ' if z else ''}{c} {s}", fill="black")
        draw.text((x + 4, y + cell_h + 15), f"on {b}", fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)

# ---------------------------------------------------------------------------------------------------
# Training helpers.

def build_tokenizer():
    """A word-level CLIPTokenizer for the 16 words of the captions, built offline and deterministically.
    BPE merges are added word by word, each only after the merges before it have been applied, so every
    word ends as one token and the ids never change (the tokenizers library's BpeTrainer breaks ties in
    hash order: its ids differed from run to run, and with them the trained text encoder)."""
    from transformers import CLIPTokenizer
    words = ["a", "on", "background", *SHAPES, *NAMES, *SIZES]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in letters + [l + "</w>" for l in letters]:  # CLIP marks a word's last symbol with </w>
        vocab[tok] = len(vocab)
    merges = []  # (left, right), earlier = applied first

    def bpe(word):  # what the BPE model does: merge the earliest-ranked adjacent pair until none applies
        toks, rank = list(word[:-1]) + [word[-1] + "</w>"], {m: r for r, m in enumerate(merges)}
        while len(toks) > 1:
            r, k = min((rank.get(p, len(rank)), k) for k, p in enumerate(zip(toks, toks[1:])))
            if r == len(rank):
                break
            toks[k:k + 2] = [toks[k] + toks[k + 1]]
        return toks

    for word in words:
        while len(toks := bpe(word)) > 1:
            merges.append((toks[0], toks[1]))
            vocab.setdefault(toks[0] + toks[1], len(vocab))
    # transformers 5 ignores vocab_file=; vocab= and merges= (as tuples) are what it reads
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in words)
    return tok


def lr_at(step, total, peak, warmup):
    # linear warmup, then cosine decay to zero: a constant LR plateaued early (docs/toy_world.md)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def train_autoencoder(args, step_seed):
    """Stage 1: the AutoencoderKL, 32x32x3 pixels -> 8x8x4 latents (3 encoder blocks, 2 downsamplings); then its latent
    scale, measured on fresh images. -> (frozen vae, the checker's rates on its reconstructions)"""
    from diffusers import AutoencoderKL
    from tqdm import tqdm
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                        norm_num_groups=16, sample_size=32)
    print(f"AutoencoderKL: {nparams(vae) / 1e6:.2f}M params; {args.vae_steps} steps x {args.vae_batch} images")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    bar = tqdm(range(args.vae_steps), desc="vae", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, args.warmup)
        seed = step_seed(1, step)
        x = render(toy_captions(args.vae_batch, seed), seed) * 2 - 1  # (B, 3, 32, 32) in [-1, 1]
        posterior = vae.encode(x).latent_dist
        x_rec = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(x_rec, x)
        kl = posterior.kl().mean()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rec=f"{rec.item():.4f}")
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            tqdm.write(f"vae step {step:5d} | rec mse {rec.item():.5f} | kl {kl.item():.1f} | lr {opt.param_groups[0]['lr']:.2e}")
    vae.eval().requires_grad_(False)
    # Latent scale: SD multiplies latents by vae.config.scaling_factor (0.18215 for its VAE) so the diffusion sees
    # ~unit variance. Ours is measured on --scale_n fresh images and saved in the config.
    with torch.no_grad():
        caps = toy_captions(args.scale_n, args.seed + 7)
        z = vae.encode(render(caps, args.seed + 7) * 2 - 1).latent_dist.sample()  # (scale_n, 4, 8, 8)
        x_rec = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    vae.register_to_config(scaling_factor=1.0 / z.std().item())
    rates = match_rates(x_rec, caps)
    print(f"latent std {z.std().item():.3f} -> scaling_factor {vae.config.scaling_factor:.4f}; "
          f"checker on reconstructions: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    return vae, rates


def train_denoiser(args, vae, step_seed):
    """Stage 2: the text encoder and the UNet, trained jointly with the epsilon loss on latents of fresh images.
    -> (tokenizer, text_encoder, unet, scheduler)"""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=4)  # (diffusers: head count)
    # SD v1's training schedule; DDIM sampling later uses the same betas
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    alphas_cumprod = scheduler.alphas_cumprod  # (1000,) alpha-bar_t
    print(f"UNet: {nparams(unet) / 1e6:.2f}M params, text encoder: {nparams(text_encoder) / 1e6:.2f}M params, "
          f"vocab {len(tokenizer)}; {args.unet_steps} steps x {args.unet_batch} images = {args.unet_steps * args.unet_batch} samples")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    bar = tqdm(range(args.unet_steps), desc="unet", unit="step")
    loss_avg = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, args.warmup)
        seed = step_seed(2, step)
        g = torch.Generator().manual_seed(seed)
        drop_size = (torch.rand(args.unet_batch, generator=g) < args.bare).tolist()
        captions = [bare(c) if d else c for c, d in zip(toy_captions(args.unet_batch, seed), drop_size)]
        with torch.no_grad():  # sizes obeyed half the time (toy_world.FOLLOW): loose captions, as on the web
            x = render(captions, seed, follow=FOLLOW)
            z0 = vae.encode(x * 2 - 1).latent_dist.sample(g) * vae.config.scaling_factor  # (B, 4, 8, 8)
        # caption dropout: the pipeline's unconditional branch encodes "" the same way
        drop = torch.rand(len(captions), generator=g) < args.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids  # (B, 16)
        cond = text_encoder(ids)[0]  # (B, 16, 64); no attention mask, like the pipeline
        t = torch.randint(0, 1000, (len(captions),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps  # forward process, DDPM eq. 4
        loss = F.mse_loss(unet(z_t, t, cond).sample, eps)  # epsilon loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if step % args.log_every == 0 or step == args.unet_steps - 1:
            tqdm.write(f"unet step {step:5d} | eps mse {loss.item():.4f} (avg {loss_avg:.4f}) | lr {opt.param_groups[0]['lr']:.2e}")
    return tokenizer, text_encoder.eval(), unet.eval(), scheduler


def tiny_clip(tokenizer, text_layers=2):
    """A CLIPModel the size of the toy world: 32x32 images in 4x4 patches, width 64, 32-dim embeddings."""
    from transformers import CLIPConfig, CLIPModel
    layers = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), num_hidden_layers=text_layers, bos_token_id=tokenizer.bos_token_id,
                         max_position_embeddings=tokenizer.model_max_length, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **layers),
        vision_config=dict(image_size=32, patch_size=4, num_hidden_layers=3, **layers), projection_dim=32))


def train_rewards(args, step_seed, out, model_dir):
    """Stage 3: the two learned rewards, in the folders load_reward reads (out/toyclip, out/toypref).
    toyclip: a tiny CLIP trained contrastively (InfoNCE both ways) on rendered images, blurred and noised as generated
    ones are, against their captions; each batch has distinct captions. toypref: a tiny CLIP image tower with the
    aesthetic predictor's head (the same MLP), trained on the pairs of a batch ranked by preference_truth
    (Bradley-Terry, pairs closer than 0.05 skipped). Both see images through rewards.clip_preprocess, as they will.
    -> their held-out agreement with their truths (agreement(), also on model_dir's samples)."""
    import rewards
    from tqdm import tqdm
    tokenizer, pool = build_tokenizer(), all_captions("train") + all_captions("heldout")
    clip, pref = tiny_clip(tokenizer), tiny_clip(tokenizer, text_layers=1)
    head = rewards.aesthetic_mlp(32)
    print(f"toyclip: {nparams(clip) / 1e6:.2f}M params; toypref: {(nparams(pref) + nparams(head)) / 1e6:.2f}M params; "
          f"{args.reward_steps} steps x {args.reward_batch} images each")
    embed = lambda model, x: F.normalize(model.get_image_features(pixel_values=rewards.clip_preprocess(x, 32)).pooler_output,
                                         dim=-1)
    opt = torch.optim.AdamW([*clip.parameters(), *pref.parameters(), *head.parameters()], lr=args.reward_lr)
    bar = tqdm(range(args.reward_steps), desc="rewards", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.reward_steps, args.reward_lr, args.warmup)
        seed = step_seed(3, step)
        g = torch.Generator().manual_seed(seed)
        captions = [pool[i] for i in torch.randperm(len(pool), generator=g)[:args.reward_batch].tolist()]
        x = degrade(render(captions, seed), g)  # (B, 3, 32, 32), each at its caption's size
        tok = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        txt = F.normalize(clip.get_text_features(**tok).pooler_output, dim=-1)
        logits = clip.logit_scale.exp() * embed(clip, x) @ txt.T  # (B, B): image i against caption j
        target = torch.arange(len(captions))
        loss_clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        x = degrade(render(captions, seed + 1, follow=FOLLOW), g)  # toypref: shapes of every size too
        score, truth = head(embed(pref, x)).squeeze(-1), preference_truth(x)
        better = truth[:, None] - truth[None, :] > 0.05  # (B, B): image i preferred to image j
        loss_pref = (F.softplus(-(score[:, None] - score[None, :]))[better].mean() if better.any()
                     else score.sum() * 0)  # a batch without a pair 0.05 apart: nothing to rank
        opt.zero_grad(set_to_none=True)
        (loss_clip + loss_pref).backward()
        opt.step()
        bar.set_postfix(clip=f"{loss_clip.item():.3f}", pref=f"{loss_pref.item():.3f}")
        if step % args.log_every == 0 or step == args.reward_steps - 1:
            tqdm.write(f"rewards step {step:5d} | clip {loss_clip.item():.4f} | pref {loss_pref.item():.4f}")
    with atomic_dir(os.path.join(out, "toyclip")) as tmp:
        clip.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    with atomic_dir(os.path.join(out, "toypref")) as tmp:  # the aesthetic predictor's layout: a CLIP and its head
        pref.eval().save_pretrained(tmp)
        torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, os.path.join(tmp, "aesthetic-model.pth"))
    return agreement(args, out, model_dir)


def agreement(args, out, model_dir):
    """Each learned reward against its truth, on 512 fresh rendered images (blurred and noised) and on 64 (at most
    --eval_n) images the toy model in model_dir samples for held-out captions. toyclip: how often it scores the caption the checker reads
    in the image above the same caption with one part (shape, colour, background or size) changed. toypref: how often it
    orders a pair as preference_truth does (pairs closer than 0.05 left out), and the rank correlation. -> {...}"""
    import rewards
    clip, pref = (rewards.load_reward(name, os.path.join(out, name)) for name in ("toyclip", "toypref"))
    g = torch.Generator().manual_seed(args.eval_seed + 3)
    rendered = degrade(render(toy_captions(512, args.eval_seed + 3, "heldout"), args.eval_seed + 3), g)
    held = toy_captions(min(64, args.eval_n), args.eval_seed + 4, split="heldout")  # --eval_n 0: none
    generated = sample_toy(model_dir, held, args.eval_seed + 4, 20) if held else rendered[:0]
    spearman = lambda a, b: float(torch.corrcoef(torch.stack([a.argsort().argsort().float(), b.argsort().argsort().float()]))[0, 1])
    result = {}
    for kind, x in (("rendered", rendered), ("generated", generated)):
        if len(x):
            got = classify(x)
            keep = (got["colour"] >= 0) & (got["shape"] >= 0)  # the checker reads a whole caption
            x, got = x[keep], {k: v[keep] for k, v in got.items()}
        if len(x) < 2:  # a model that draws no caption yet (a remake of a few steps): nothing to agree on
            result[kind] = {"images": len(x), "toyclip_right_caption_first": None, "toypref_pairs_ordered_as_truth": None,
                            "toypref_spearman": None}
            continue
        read = [caption(NAMES[c], SHAPES[s], NAMES[b], SIZES[z]) for c, s, b, z in
                zip(got["colour"].tolist(), got["shape"].tolist(), got["background"].tolist(), got["size"].tolist())]
        wrong = [change_one_part(c, k) for k, c in enumerate(read)]
        with torch.no_grad():
            right_scores, wrong_scores = clip(x, read), clip(x, wrong)
            score, truth = pref(x, [""] * len(x)), preference_truth(x)
        pairs = (truth[:, None] - truth[None, :]).abs() > 0.05
        agree = ((score[:, None] > score[None, :]) == (truth[:, None] > truth[None, :]))[pairs]
        rho = spearman(score, truth)
        result[kind] = {"images": len(x), "toyclip_right_caption_first": (right_scores > wrong_scores).float().mean().item(),
                        "toypref_pairs_ordered_as_truth": agree.float().mean().item() if len(agree) else None,
                        "toypref_spearman": rho if rho == rho else None}  # None, not NaN, in toy.json
    return result


def change_one_part(text, k):
    """The caption with its shape, its colour, its background or its size (the k-th image's choice, cycling over the
    parts it has) changed to another valid one."""
    c, s, b, z = parse_caption(text)
    parts = 4 if z else 3
    part, turn = k % parts, k // parts
    if part == 0:
        s = SHAPES[(SHAPES.index(s) + 1 + turn % 2) % 3]
    elif part == 3:
        z = SIZES[1 - SIZES.index(z)]
    else:
        other = [n for n in NAMES if n not in (c, b)]
        c, b = (other[turn % len(other)], b) if part == 1 else (c, other[turn % len(other)])
    return caption(c, s, b, z)


def measure(args, out):
    """The acceptance numbers: the checker on procedural images, then its rates on held-out (never trained) captions."""
    real = toy_captions(4096, args.eval_seed + 1, split="heldout")
    print("checker on 4096 procedural images: " + ", ".join(
        f"{k} {v:.4f}" for k, v in match_rates(render(real, args.eval_seed + 2), real).items()))
    captions = toy_captions(args.eval_n, args.eval_seed, split="heldout")
    t0 = time.time()
    images = sample_toy(out, captions, args.eval_seed, args.ddim_steps, args.guidance_scale)
    rates = match_rates(images, captions)
    print(f"held-out caption match, {args.eval_n} captions, guidance {args.guidance_scale}, {args.ddim_steps} DDIM steps "
          f"({time.time() - t0:.0f} s): " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    plain = [bare(c) for c in captions]  # the same captions without their size
    rates = match_rates(sample_toy(out, plain, args.eval_seed, args.ddim_steps, args.guidance_scale), plain)
    print("held-out caption match without the size: " +
          ", ".join(f"{k} {v:.3f}" for k, v in rates.items() if v is not None))
    if args.grid:
        save_grid(images[:24], captions[:24], args.grid)
        print(f"grid of 24 samples -> {args.grid}")


def main(args):
    out = os.path.abspath(args.out)
    # Bad input first, before the heavy imports and any work: refuse before spending half an hour, not after.
    if args.eval_only and not os.path.isdir(out):
        raise UserError(f"--eval_only needs a model folder, and '{args.out}' does not exist; pass --out DIR")
    if min(args.reward_steps, args.reward_batch) < 1:
        raise UserError("--reward_steps and --reward_batch must be at least 1")
    if args.only_rewards and not os.path.isfile(os.path.join(out, "model_index.json")):
        raise UserError(f"--only_rewards trains the rewards of a model in --out, and '{args.out}' holds none")
    if not (args.eval_only or args.only_rewards) and os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UserError(f"'{args.out}' exists and is not empty; choose another --out or pass --overwrite")
    for flag in ("seed", "eval_seed"):  # the recipe packs seed, stage and step into one 64-bit generator seed
        if not 0 <= getattr(args, flag) < 2**32:
            raise UserError(f"--{flag} must be an integer from 0 to 2^32 - 1 (got {getattr(args, flag)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    t_start = time.time()
    step_seed = lambda stage, step: args.seed * 1_000_003 + stage * 100_000 + step  # distinct data per step
    if args.only_rewards:  # the rewards of the model already in --out, each folder replaced as a whole
        torch.manual_seed(args.seed + 3)
        agree = train_rewards(args, step_seed, out, out)
        record = {}  # the model's provenance, if it has one, gains a "rewards" entry
        if os.path.isfile(os.path.join(out, "toy.json")):
            with open(os.path.join(out, "toy.json")) as f:
                record = json.load(f)
        record["rewards"] = {"args": {k: getattr(args, k) for k in ("seed", "reward_steps", "reward_batch", "reward_lr",
                                                                    "warmup")}, "train_seconds": round(time.time() - t_start),
                             "held_out_agreement": agree}
        with atomic_file(os.path.join(out, "toy.json")) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        print(f"held-out agreement: {json.dumps(agree)}")
    elif not args.eval_only:
        from diffusers import StableDiffusionPipeline
        torch.manual_seed(args.seed)
        vae, rec_rates = train_autoencoder(args, step_seed)
        tokenizer, text_encoder, unet, scheduler = train_denoiser(args, vae, step_seed)
        train_s = time.time() - t_start
        # An ordinary StableDiffusionPipeline folder, written to a temporary sibling and renamed into place: a kill
        # never leaves a half-written model, and an earlier model stays intact.
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        with atomic_dir(out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            torch.manual_seed(args.seed + 3)
            t_rewards = time.time()
            agree = train_rewards(args, step_seed, tmp, tmp)  # the rewards, on the model just made
            with open(os.path.join(tmp, "toy.json"), "w") as f:  # provenance; from_pretrained ignores it
                recipe = {k: v for k, v in vars(args).items() if k not in ("out", "grid", "overwrite", "eval_only")}
                json.dump({"args": recipe, "train_seconds": round(train_s), "threads": torch.get_num_threads(),
                           "checker_on_vae_reconstructions": rec_rates,
                           "rewards": {"train_seconds": round(time.time() - t_rewards), "held_out_agreement": agree}},
                          f, indent=2)
        print(f"saved {out} after {time.time() - t_start:.0f} s of training")
    if args.eval_n and not args.only_rewards:
        measure(args, out)
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    one_line_errors(parser)  # here, not at import: train_rid.py and eval.py import this file
    main(parser.parse_args())
