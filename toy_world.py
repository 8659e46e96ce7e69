"""
toy_world.py: the toy world, rid's character-level Shakespeare, as data and rules (no weights, nothing trained here).
Procedural 32x32 images of a coloured shape on a coloured background, captioned "a red circle on a blue background"
(render, all_captions, toy_captions); a pixel-rule caption checker that says whether an image shows the shape, the
shape's colour and the background its caption asks for (classify, check_captions); and the ground truths of the
two learned toy rewards (caption_truth for toyclip, preference_truth for toypref), by rule from the pixels.

toy.py trains a model and the learned rewards on this world; eval.py measures runs with its checker and truths.
Everything here is our own design; the paper has no toy world.

    from toy_world import render, check_captions, toy_captions, caption_truth, preference_truth
"""
import math

import torch
import torch.nn.functional as F

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
