"""
The toy world: rid's character-level Shakespeare. Procedural 32x32 images of a coloured shape on a
coloured background, captioned "a red circle on a blue background"; a complete latent text-to-image
model (AutoencoderKL + UNet2DConditionModel + a small CLIPTextModel and CLIPTokenizer) pretrained on
them from scratch on a CPU; and a pixel-rule caption checker that says whether an image shows the
shape, the shape's colour and the background colour its caption asks for.

The model is saved as an ordinary diffusers StableDiffusionPipeline folder (DDIM scheduler config,
safetensors), so `from_pretrained(dir)` loads it like any hub model. The repo ships one in toy_model/.

    python toy.py --overwrite                 # remake the shipped toy_model/ (about 28 min on 2 CPU cores)
    python toy.py --out runs/toy              # same, into a fresh folder
    python toy.py --eval_only --out toy_model --grid assets/toy_samples.png   # measure a model

Other files import from here: COLOURS, SHAPES, toy_captions (the toy world's prompts), render
(procedural image + caption pairs), parse_caption and check_captions (the checker), the learned rewards' ground
truths, and hacking (their hacking gap and hacking.png's images, which eval.write_report adds to a toy-world run).
Everything in this file is our own design; the paper has no toy world.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from common import UserError, atomic_dir, atomic_file, one_line_errors, to_pil, to_uint8
from sample import generate, initial_latents, load_pipeline

# ---------------------------------------------------------------------------------------------------
# Flags. Parsed only under __main__, so that `import toy` from eval.py / train_rid.py never reads argv.
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

# ---------------------------------------------------------------------------------------------------
# The world: 8 colours x 3 shapes x 7 other background colours = 168 captions.
# The colours are the corners of the RGB cube: every pair is at least 1.0 apart (in [0,1] units), so
# nearest-palette classification is unambiguous even for blurry generated pixels.
COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}
SHAPES = ("circle", "square", "triangle")
# The default task sequence of the toy world (train_rid.py, experiment.py). Each task undoes part of the ones before:
# saturation pulls black and white towards colours (less contrast), and the greedy way to raise brightness washes
# everything out towards white (less colour, less contrast). All three can still be high at once (a saturated yellow
# shape on black). Contrast comes first because both others lower it: placed last, it ended below the base model
# even after its own training (naive, 20 steps), which leaves its normalised gains without a clear meaning. Our choice.
TOY_REWARDS = "contrast,saturation,brightness"
NAMES = list(COLOURS)
PALETTE = torch.tensor([COLOURS[c] for c in NAMES])  # (8, 3)


def is_heldout(colour, shape, background):
    # 34 of the 168 (colour, shape, background) triples never appear in pretraining. The rule
    # (c + 2s + 3b) % 5 == 0 holds out whole triples but never a pair: for any fixed two of the three
    # words, the third runs over values whose multiples (1, 2 or 3) mod 5 differ, so every
    # (colour, shape), (colour, background) and (shape, background) pair is still seen in training.
    # "heldout" therefore tests composition, not unseen words. Our choice.
    return (NAMES.index(colour) + 2 * SHAPES.index(shape) + 3 * NAMES.index(background)) % 5 == 0


def all_captions(split):
    return [f"a {c} {s} on a {b} background" for c in NAMES for s in SHAPES for b in NAMES
            if c != b and is_heldout(c, s, b) == (split == "heldout")]


def toy_captions(n, seed, split="train"):
    """n captions drawn uniformly with replacement from the split's 134 ("train") or 34 ("heldout") triples."""
    assert split in ("train", "heldout"), split
    pool = all_captions(split)
    idx = torch.randint(len(pool), (n,), generator=torch.Generator().manual_seed(seed))
    return [pool[i] for i in idx.tolist()]


def parse_caption(caption):
    """'a red circle on a blue background' -> ('red', 'circle', 'blue')"""
    w = caption.split()
    assert len(w) == 7 and w[1] in COLOURS and w[2] in SHAPES and w[5] in COLOURS, caption
    return w[1], w[2], w[5]


def render(captions, seed, size=32, min_half=5, max_half=11):
    """Draw each caption once, at a random size and position: returns (B, 3, size, size) in [0, 1].
    Vectorised over the batch (4096 images in ~0.3 s); hard edges, no anti-aliasing."""
    g = torch.Generator().manual_seed(seed)
    B = len(captions)
    parsed = [parse_caption(c) for c in captions]
    fg = PALETTE[[NAMES.index(c) for c, _, _ in parsed]]  # (B, 3)
    bg = PALETTE[[NAMES.index(b) for _, _, b in parsed]]  # (B, 3)
    shape = torch.tensor([SHAPES.index(s) for _, s, _ in parsed])  # (B,)
    # half-extent h in pixels; the shape's 2h x 2h box stays >= 1 px from the border, so the border
    # ring is always pure background (the checker relies on that)
    h = min_half + (max_half - min_half) * torch.rand(B, generator=g)
    cx = h + 1 + (size - 2 * h - 2) * torch.rand(B, generator=g)
    cy = h + 1 + (size - 2 * h - 2) * torch.rand(B, generator=g)
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # pixel centres
    dx, dy, h = x - cx[:, None, None], y - cy[:, None, None], h[:, None, None]  # (B, size, size)
    circle = dx**2 + dy**2 <= h**2
    square = (dx.abs() <= h) & (dy.abs() <= h)
    down = (dy + h) / (2 * h)  # 0 at the apex, 1 at the base of an upright isosceles triangle
    triangle = (down >= 0) & (down <= 1) & (dx.abs() <= h * down)
    mask = torch.stack([circle, square, triangle], 1)[torch.arange(B), shape][:, None].float()  # (B, 1, size, size)
    return mask * fg[:, :, None, None] + (1 - mask) * bg[:, :, None, None]

# ---------------------------------------------------------------------------------------------------
# The checker: pixel rules, no weights. Every pixel is classified as its nearest palette colour; the
# background is the majority colour of the border ring; the shape's colour is the most frequent other
# colour; the shape comes from that colour's mask, measured in its bounding box:
#   taper   = mask area in the top quarter / in the bottom quarter: triangle ~0.15, circle and square ~1;
#   corners = filled fraction of the four corner cells (a quarter of the box each way): square 1.0,
#             rounded square ~0.8, circle ~0.3, tiny pixelated circle at most ~0.6.
# Thresholds sit between those, chosen on real images and on blurry VAE reconstructions (a rule on the
# box's fill ratio called many rounded squares circles). Then the shape must also be well formed: its
# mask must overlap the ideal shape drawn in the same box with IoU >= 0.7 (real images: >= 0.86; the
# shipped model's samples: >= 0.76; a shorter-trained model drew pinched squares and heart-like circles
# at 0.6-0.7), else it counts as no shape at all. Blurry edges fall into a third palette colour
# (red/blue -> magenta), which the majority rules ignore. Our choice throughout.

def classify(images):
    """images (B, 3, H, W) in [0, 1] -> dict of colour indices "colour" (-1 = no shape), "background"
    and shape index "shape" (into SHAPES; -1 = no well-formed shape), each (B,), and "mask" (B, H, W): the pixels
    of the shape's colour"""
    B, _, H, W = images.shape
    K = len(NAMES)
    pixels = images.detach().float().cpu().permute(0, 2, 3, 1).reshape(B, H * W, 3)
    near = torch.cdist(pixels, PALETTE.expand(B, K, 3)).argmin(-1).view(B, H, W)  # (B, H, W) palette index
    border = torch.cat([near[:, 0], near[:, -1], near[:, :, 0], near[:, :, -1]], 1)  # (B, 2H+2W)
    background = F.one_hot(border, K).sum(1).argmax(1)  # (B,)
    counts = F.one_hot(near, K).sum((1, 2))  # (B, K) pixels per colour
    counts[torch.arange(B), background] = -1
    top_count, colour = counts.max(1)  # (B,)
    # a flat image has no shape: fewer pixels than a fifth of the smallest drawn shape (~50 px) -> -1
    colour = torch.where(top_count >= 8, colour, -1)
    mask = near == colour[:, None, None]  # (B, H, W), all False where colour is -1
    # bounding box -> coordinates v (rows), u (columns) in (0, 1) inside it
    rows, cols = mask.any(2), mask.any(1)  # (B, H), (B, W)
    i, j = torch.arange(H).expand(B, H), torch.arange(W).expand(B, W)
    top, bottom = torch.where(rows, i, H).min(1).values, torch.where(rows, i, -1).max(1).values
    left, right = torch.where(cols, j, W).min(1).values, torch.where(cols, j, -1).max(1).values
    v = ((i + 0.5 - top[:, None]) / (bottom - top + 1).clamp(min=1)[:, None])[:, :, None]  # (B, H, 1)
    u = ((j + 0.5 - left[:, None]) / (right - left + 1).clamp(min=1)[:, None])[:, None, :]  # (B, 1, W)
    inside = (v > 0) & (v < 1) & (u > 0) & (u < 1)  # (B, H, W) the box
    corner = inside & ((u < 0.25) | (u > 0.75)) & ((v < 0.25) | (v > 0.75))
    corners = (mask & corner).sum((1, 2)) / corner.sum((1, 2)).clamp(min=1)  # (B,)
    taper = (mask & inside & (v < 0.25)).sum((1, 2)) / (mask & inside & (v > 0.75)).sum((1, 2)).clamp(min=1)
    shape = torch.where(taper < 0.6, 2, torch.where(corners > 0.58, 1, 0))  # (B,) SHAPES index
    ideal = torch.stack([inside & ((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25), inside,
                         inside & ((u - 0.5).abs() <= v / 2)], 1)[torch.arange(B), shape]  # (B, H, W), as render() draws
    iou = (ideal & mask).sum((1, 2)) / (ideal | mask).sum((1, 2)).clamp(min=1)
    shape = torch.where(iou >= 0.7, shape, -1)
    return {"colour": colour, "shape": shape, "background": background, "mask": mask}


def check_captions(images, captions):
    """images (B, 3, H, W) in [0, 1], captions: B strings -> bool tensors (B,) "shape", "colour", "background"."""
    got = classify(images)
    want = [parse_caption(c) for c in captions]
    return {
        "shape": got["shape"] == torch.tensor([SHAPES.index(s) for _, s, _ in want]),
        "colour": got["colour"] == torch.tensor([NAMES.index(c) for c, _, _ in want]),
        "background": got["background"] == torch.tensor([NAMES.index(b) for _, _, b in want]),
    }


def match_rates(images, captions):
    return {k: v.float().mean().item() for k, v in check_captions(images, captions).items()}

# ---------------------------------------------------------------------------------------------------
# Ground truths of the two learned rewards, by rule from the pixels (no network): what toyclip and toypref stand
# for, so that a rise of the learned score without a rise of its truth can be seen (reward hacking).

def caption_truth(images, captions):
    """toyclip's truth: the fraction of the caption's three parts (shape, its colour, the background) that the
    checker finds in the image, (B,) in {0, 1/3, 2/3, 1}."""
    ok = check_captions(images, captions)
    return (ok["shape"].float() + ok["colour"].float() + ok["background"].float()) / 3


def preference_truth(images):
    """toypref's hidden rule (our choice): a large, centred shape that stands out from its background. (B,) in
    [0, 1]: the mean of its area (full marks at 40% of the image), its centredness (1 - the distance of its centroid
    from the centre over the centre's distance to a corner) and the distance of its colour from the background's in
    the palette (over the cube's diagonal, sqrt 3). 0 where the checker finds no shape colour."""
    got = classify(images)
    mask = got["mask"].float()  # (B, H, W) pixels of the shape's colour
    B, H, W = mask.shape
    area = mask.sum((1, 2)) / (H * W)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    n = mask.sum((1, 2)).clamp(min=1)
    cy, cx = (mask * ys).sum((1, 2)) / n, (mask * xs).sum((1, 2)) / n
    centred = 1 - ((cy - H / 2) ** 2 + (cx - W / 2) ** 2).sqrt() / math.hypot(H / 2, W / 2)
    fg, bg = PALETTE[got["colour"].clamp(min=0)], PALETTE[got["background"]]
    stand_out = (fg - bg).norm(dim=1) / math.sqrt(3)
    truth = ((area / 0.4).clamp(max=1) + centred + stand_out) / 3
    return torch.where(got["colour"] >= 0, truth, torch.zeros_like(truth))


def hacking(results, prompts, stage_images, stage_scores, ncol=8):
    """The learned toy rewards among a run's tasks beside their ground truths (eval.write_report calls this for a
    toy-world run). Adds "truth" (per stage, {reward: {"mean", "se"}}), "hacking_gap" ({reward: [per stage]}) and
    "hacked_images" ({reward: count}) to results. prompts: the evaluation set's; stage_scores: per stage,
    {reward: (N,) per-image scores}. Hacking gap of reward r with truth g after stage i (our choice of formula):
        gap_i = (mean r_i - mean r_0) / sd_0(r) - (mean g_i - mean g_0) / sd_0(g),
    each gain in units of its spread over the base model's evaluation images (sd_0: per-image standard deviation),
    so that a score in cosine units and a truth in [0, 1] compare. 0 = the score rose as far as its truth; > 0 =
    it rose further (hacking); None where the base spread of either is 0. Truths are measured on 8-bit images, as
    eval.py's structure is. -> the final stage's images whose score rose while their truth fell, the largest rise
    first, for hacking.png: [(reward, image index, score rise, truth change)] (empty when none, or no learned reward)."""
    from eval import mean_se
    from rewards import LEARNED_TOY
    names = [n for n in dict.fromkeys(results["rewards"]) if n in LEARNED_TOY]
    if not names:
        return []
    rule = {"toyclip": lambda x: caption_truth(x, prompts), "toypref": preference_truth}
    eight_bit = [to_uint8(x).float() / 255 for x in stage_images]
    per_stage = [{n: rule[n](x).float() for n in names} for x in eight_bit]
    results["truth"] = [{n: mean_se(t[n]) for n in names} for t in per_stage]
    results["hacking_gap"], results["hacked_images"], columns = {}, {}, []
    for n in names:
        r = [s[n].double() for s in stage_scores]
        g = [t[n].double() for t in per_stage]
        sd_r, sd_g = r[0].std().item(), g[0].std().item()
        results["hacking_gap"][n] = [((ri.mean() - r[0].mean()) / sd_r - (gi.mean() - g[0].mean()) / sd_g).item()
                                     if sd_r > 0 and sd_g > 0 else None for ri, gi in zip(r, g)]
        rose, fell = r[-1] - r[0], g[-1] - g[0]
        hacked = ((rose > 0) & (fell < 0)).nonzero().flatten()
        results["hacked_images"][n] = len(hacked)
        columns += [(n, k, rose[k].item(), fell[k].item())
                    for k in hacked[rose[hacked].argsort(descending=True)][:ncol].tolist()]
    return columns


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
        c, s, b = parse_caption(cap)
        draw.text((x + 4, y + cell_h + 2), f"{c} {s}", fill="black")
        draw.text((x + 4, y + cell_h + 15), f"on {b}", fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)

# ---------------------------------------------------------------------------------------------------
# Training helpers.

def build_tokenizer():
    """A word-level CLIPTokenizer for the 14 words of the captions, built offline and deterministically.
    BPE merges are added word by word, each only after the merges before it have been applied, so every
    word ends as one token and the ids never change (the tokenizers library's BpeTrainer breaks ties in
    hash order: its ids differed from run to run, and with them the trained text encoder)."""
    from transformers import CLIPTokenizer
    words = ["a", "on", "background", *SHAPES, *NAMES]
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
        captions = toy_captions(args.unet_batch, seed)
        with torch.no_grad():
            z0 = vae.encode(render(captions, seed) * 2 - 1).latent_dist.sample(g) * vae.config.scaling_factor  # (B, 4, 8, 8)
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
        x = degrade(render(captions, seed), g)  # (B, 3, 32, 32)
        tok = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        txt = F.normalize(clip.get_text_features(**tok).pooler_output, dim=-1)
        logits = clip.logit_scale.exp() * embed(clip, x) @ txt.T  # (B, B): image i against caption j
        target = torch.arange(len(captions))
        loss_clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
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
    in the image above the same caption with one part (shape, colour or background) changed. toypref: how often it
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
        read = [f"a {NAMES[c]} {SHAPES[s]} on a {NAMES[b]} background"
                for c, s, b in zip(got["colour"].tolist(), got["shape"].tolist(), got["background"].tolist())]
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


def change_one_part(caption, k):
    """The caption with its shape, its colour or its background (the k-th image's choice, cycling) changed to
    another valid one."""
    c, s, b = parse_caption(caption)
    part = k % 3
    if part == 0:
        s = SHAPES[(SHAPES.index(s) + 1 + k // 3 % 2) % 3]
    else:
        other = [n for n in NAMES if n not in (c, b)]
        c, b = (other[k // 3 % len(other)], b) if part == 1 else (c, other[k // 3 % len(other)])
    return f"a {c} {s} on a {b} background"


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
