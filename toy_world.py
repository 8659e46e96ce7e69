"""
toy_world.py: the toy world, rid's character-level Shakespeare, as data and rules (no weights, nothing trained here).
Procedural 32x32 images of a coloured shape on a coloured background, captioned "a small red circle on a blue
background" (render, all_captions, toy_captions; the size may be left out); a pixel-rule caption checker that says
whether an image shows the shape, the shape's colour, the background and the size its caption asks for (classify,
check_captions); and the ground truths of the two learned toy rewards (caption_truth for toyclip,
preference_truth for toypref), by rule from the pixels.

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
# The size part: "small" or "large", read from the shape's bounding box (its longer side, cut at SIZE_EDGE pixels).
# A caption may leave it out (any size, half-extent 5 to 11 px). In pretraining a caption's size is right only half
# the time (FOLLOW; otherwise the shape has any size), as web captions are loose. With guidance 7.5 the base model
# then draws large shapes whatever the caption says (guidance inflates shapes, docs/toy_world.md), so it follows
# "large" and mostly not "small": a prompt reward has something to learn, and toypref's taste for large shapes
# fights it. Drawn sizes keep 2.5 px of half-extent between the two, so the checker reads every rendered size
# right. Our choice (docs/toy_world.md says why not position, or three sizes).
SIZES = ("small", "large")
SIZE_HALF = {"small": (5.0, 6.5), "large": (9.0, 11.0)}  # h when the size is obeyed
SIZE_EDGE = 15.5  # the checker's cut on the bounding box's longer side, in pixels
FOLLOW = 0.5


def is_heldout(colour, shape, background):
    # 34 of the 168 (colour, shape, background) triples never appear in pretraining. The rule
    # (c + 2s + 3b) % 5 == 0 holds out whole triples but never a pair: for any fixed two of the three
    # words, the third runs over values whose multiples (1, 2 or 3) mod 5 differ, so every
    # (colour, shape), (colour, background) and (shape, background) pair is still seen in training.
    # "heldout" therefore tests composition, not unseen words. Our choice.
    return (NAMES.index(colour) + 2 * SHAPES.index(shape) + 3 * NAMES.index(background)) % 5 == 0


def caption(colour, shape, background, size=None):
    return f"a {size + ' ' if size else ''}{colour} {shape} on a {background} background"


def bare(text):
    """The caption without its size part: 'a small red circle on a blue background' -> 'a red circle on a blue
    background'."""
    c, s, b, _ = parse_caption(text)
    return caption(c, s, b)


def all_captions(split, sizes=True):
    """The split's 134 ("train") or 34 ("heldout") triples, each at both sizes (sizes=False: without one)."""
    return [caption(c, s, b, z) for c in NAMES for s in SHAPES for b in NAMES
            if c != b and is_heldout(c, s, b) == (split == "heldout") for z in (SIZES if sizes else [None])]


def toy_captions(n, seed, split="train"):
    """n captions with a size, drawn uniformly with replacement from the split's 268 ("train") or 68
    ("heldout")."""
    assert split in ("train", "heldout"), split
    pool = all_captions(split)
    idx = torch.randint(len(pool), (n,), generator=torch.Generator().manual_seed(seed))
    return [pool[i] for i in idx.tolist()]


def parse_caption(caption):
    """'a small red circle on a blue background' -> ('red', 'circle', 'blue', 'small'); the size is None where the
    caption has none"""
    w = caption.split()
    size = w.pop(1) if len(w) == 8 else None
    assert len(w) == 7 and w[1] in COLOURS and w[2] in SHAPES and w[5] in COLOURS and size in (None, *SIZES), caption
    return w[1], w[2], w[5], size


def render(captions, seed, size=32, min_half=5, max_half=11, follow=1.0):
    """Draw each caption once, at a random size and place: returns (B, 3, size, size) in [0, 1]. A caption's
    size is obeyed with probability `follow` (h drawn from SIZE_HALF); otherwise, and without one, h is anything from
    min_half to max_half. Vectorised over the batch (4096 images in ~0.3 s); hard edges, no anti-aliasing."""
    g = torch.Generator().manual_seed(seed)
    B = len(captions)
    parsed = [parse_caption(c) for c in captions]
    fg = PALETTE[[NAMES.index(c) for c, _, _, _ in parsed]]  # (B, 3)
    bg = PALETTE[[NAMES.index(b) for _, _, b, _ in parsed]]  # (B, 3)
    shape = torch.tensor([SHAPES.index(s) for _, s, _, _ in parsed])  # (B,)
    # half-extent h in pixels; the shape's 2h x 2h box stays >= 1 px from the border, so the border
    # ring is always pure background (the checker relies on that)
    u, ux, uy = torch.rand(B, generator=g), torch.rand(B, generator=g), torch.rand(B, generator=g)
    asked = [z for _, _, _, z in parsed]
    obey = torch.tensor([z is not None for z in asked]) & (torch.rand(B, generator=g) < follow)
    lo, hi = (torch.tensor([SIZE_HALF[z][k] if z else 0.0 for z in asked]) for k in (0, 1))
    h = torch.where(obey, lo + (hi - lo) * u, min_half + (max_half - min_half) * u)
    cx = h + 1 + (size - 2 * h - 2) * ux
    cy = h + 1 + (size - 2 * h - 2) * uy
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
    """images (B, 3, H, W) in [0, 1] -> dict of colour indices "colour" (-1 = no shape), "background",
    shape index "shape" (into SHAPES; -1 = no well-formed shape) and "size" (into SIZES: the longer side of the
    bounding box of the shape colour's pixels, cut at SIZE_EDGE; -1 = no shape colour), each (B,), and "mask"
    (B, H, W): the pixels of the shape's colour"""
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
    extent = torch.maximum(bottom - top + 1, right - left + 1).float()  # (B,) pixels
    size = torch.where(colour >= 0, (extent > SIZE_EDGE).long(), -1)
    return {"colour": colour, "shape": shape, "background": background, "size": size, "mask": mask}


def check_captions(images, captions):
    """images (B, 3, H, W) in [0, 1], captions: B strings -> bool tensors (B,) "shape", "colour", "background",
    "size" (True where the caption asks for no size), and "asks_size" (the captions that do)."""
    got = classify(images)
    want = [parse_caption(c) for c in captions]
    asked = torch.tensor([SIZES.index(z) if z else -1 for _, _, _, z in want])
    return {
        "shape": got["shape"] == torch.tensor([SHAPES.index(s) for _, s, _, _ in want]),
        "colour": got["colour"] == torch.tensor([NAMES.index(c) for c, _, _, _ in want]),
        "background": got["background"] == torch.tensor([NAMES.index(b) for _, _, b, _ in want]),
        "size": (got["size"] == asked) | (asked < 0),
        "asks_size": asked >= 0,
    }


def match_rates(images, captions):
    """-> {"shape", "colour", "background", "size"}: the fraction of images that show each part; size over the
    captions that ask for one (None where none does)."""
    return part_rates(check_captions(images, captions))


def part_rates(ok):
    """check_captions' verdicts -> match_rates' dict (for a caller that needs both)."""
    asks = ok["asks_size"]
    rates = {k: v.float().mean().item() for k, v in ok.items() if k != "asks_size"}
    rates["size"] = ok["size"][asks].float().mean().item() if asks.any() else None
    return rates

# ---------------------------------------------------------------------------------------------------
# Ground truths of the two learned rewards, by rule from the pixels (no network): what toyclip and toypref stand
# for, so that a rise of the learned score without a rise of its truth can be seen (reward hacking).

def caption_truth(images, captions):
    """toyclip's truth: 1 where the checker finds every part of the caption in the image (shape, its colour, the
    background and, where asked, the size), else 0; (B,). All or nothing, as GenEval scores a prompt (our
    choice): a mean over the parts would cap what the one part the base model lacks can add at a quarter."""
    ok = check_captions(images, captions)
    return (ok["shape"] & ok["colour"] & ok["background"] & ok["size"]).float()


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
