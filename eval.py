"""
eval.py: the metrics of rid (docs/method.md) on a fixed, paired evaluation set. Every stage (the base
model, after task 1, after task 2, ...) samples the same prompts from the same per-image seeds, so every
comparison between stages is paired: image k of every stage starts from the same noise x_T.

    from eval import eval_set, evaluate, ril_metrics, write_report
    prompts, seeds = eval_set("toy", 64)                                     # fixed prompts and seeds
    out = evaluate(pipe, {"brightness": reward}, prompts, seeds, base_images=base["images"], toy=True)
    write_report(run_dir, results, stage_images)  # results.json, results.md, grid.png, heatmap.png

Recompute a finished run from its saved adapters (train_rid.py wrote DIR/results.json and DIR/adapters/);
the run's own files are never touched, the new ones go to DIR/eval/ (or --out):
    python eval.py --run runs/toy_rid
    python eval.py --run runs/sd_rid --device cuda --clip_model /path/to/clip-vit-large-patch14 --out runs/sd_rid/eval2
It prints the Markdown table and the largest absolute difference to the training-time reward matrix.
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from common import (UserError, image_grid, one_line_errors, pick_device_dtype, save_png, seed_for, to_uint8, write_json,
                    write_text)
from sample import TOY_MODEL, check_lora, generate, initial_latents, load_lora, load_pipeline, resolve_model, set_adapters

# Default evaluation prompts for real models (our choice): short, varied, none from a training list.
EVAL_PROMPTS = [
    "a corgi running on a beach", "a red fox in the snow", "an owl sitting on a branch", "a goldfish in a glass bowl",
    "a horse grazing in a meadow", "a cat sleeping on a windowsill", "a parrot with green feathers",
    "an elephant crossing a river", "a teapot on a wooden table", "a bicycle leaning against a wall",
    "a bowl of ramen with chopsticks", "a vintage typewriter", "a stack of old books", "a yellow rubber duck",
    "a lighthouse at sunset", "a pair of running shoes", "a busy street market at noon", "a kitchen with copper pots",
    "children flying kites in a park", "a train station on a rainy evening", "a cozy living room with a fireplace",
    "a fisherman on a small boat", "a bakery window full of bread", "a snowy mountain cabin", "a bowl of fresh fruit",
    "a robot watering plants", "a hot air balloon over fields", "a city skyline at night", "an astronaut on the moon",
    "a castle on a hill", "a waterfall in a forest", "a chess board mid game",
]


def is_toy(model):
    return resolve_model(model) == TOY_MODEL


def eval_set(model, n, seed=0):
    """n fixed prompts and n per-image seeds (the same for every run: train_rid.py uses seed 0). Toy world: captions
    whose (colour, shape, background) triple was held out of pretraining; otherwise EVAL_PROMPTS cycled. Seed of
    image k: seed_for("eval", seed, k), a stream that no training draw shares (our choice)."""
    if is_toy(model):
        import toy  # lazily: only the toy world needs it
        prompts = toy.toy_captions(n, seed, split="heldout")
    else:
        prompts = [EVAL_PROMPTS[k % len(EVAL_PROMPTS)] for k in range(n)]
    return prompts, [seed_for("eval", seed, k) for k in range(n)]

# -----------------------------------------------------------------------------
# Structure drift: per-image similarity (N,) of a stage's images to the base model's, same prompt and seed

def ssim(x, y, window=11, sigma=1.5):
    """Gaussian-window SSIM (Wang et al. 2004) of images (N, C, H, W) in [0, 1] -> (N,). Computed per channel
    (not on luma: a recolouring counts as drift) and averaged over channels and the valid positions of the
    window (no padding), as skimage's structural_similarity(gaussian_weights=True, data_range=1) does."""
    C1, C2 = 0.01 ** 2, 0.03 ** 2  # (K1 L)^2, (K2 L)^2 with dynamic range L = 1
    w = min(window, x.shape[-2], x.shape[-1])  # tiny images: shrink the window rather than fail
    g = torch.exp(-(torch.arange(w, dtype=torch.float64) - (w - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, w, w)  # one normalised 2D Gaussian per channel
    blur = lambda z: F.conv2d(z, kernel, groups=x.shape[1])
    x, y = x.double(), y.double()  # float64: E[x^2] - mu^2 cancels badly in float32 on flat images
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))
    return s.mean((1, 2, 3)).float()


def clip_embed(clip_model, images):
    """Normalised CLIP image embeddings (N, D); clip_model: transformers CLIPModel or CLIPVisionModelWithProjection."""
    from rewards import clip_preprocess
    p = next(clip_model.parameters())
    x = clip_preprocess(images, getattr(clip_model.config, "vision_config", clip_model.config).image_size)
    x = x.to(p.device, p.dtype)
    if hasattr(clip_model, "get_image_features"):
        e = clip_model.get_image_features(pixel_values=x)
        e = e if torch.is_tensor(e) else e.pooler_output  # transformers 5 returns an output object
    else:
        e = clip_model(pixel_values=x).image_embeds
    return F.normalize(e.float().cpu(), dim=-1)


CLIP_PREFERENCE = ("clip", "aesthetic", "pickscore", "hps")  # ViT-L/14 first: the usual CLIP-image metric


def clip_at_hand(rewards):
    """The CLIP model a loaded reward already holds, for CLIP-image drift at no extra cost, chosen by the fixed
    order CLIP_PREFERENCE, never by the order of the task sequence, so that two runs of the same rewards in another
    order measure drift with the same network. None when no reward holds a CLIP."""
    return next((rewards[n].model for n in CLIP_PREFERENCE if n in rewards and hasattr(rewards[n], "model")), None)


def mean_se(v):
    """Per-image values (N,) -> {"mean", "se"}, se = sample std / sqrt(N) (None for N = 1)."""
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    se = (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else None
    return {"mean": v.mean().item(), "se": se}

# -----------------------------------------------------------------------------
# One stage: sample the evaluation set, score every reward, measure drift against the base images

def gather(images, scores, rank, world):
    """Every process's share (images k = rank, rank + world, ...) -> the whole set, in order, on every process."""
    import torch.distributed as dist
    shares = [None] * world
    dist.all_gather_object(shares, (to_uint8(images), scores))  # uint8: what the PNGs hold
    n = sum(len(im) for im, _ in shares)
    order = [k for r in range(world) for k in range(r, n, world)]  # position of each gathered image in the set
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(n)
    images = torch.cat([im for im, _ in shares]).float()[inverse] / 255
    return images, {k: torch.cat([sc[k] for _, sc in shares])[inverse] for k in scores}


@torch.no_grad()
def evaluate(pipe, rewards, prompts, seeds, ddim_steps=50, guidance_scale=7.5, eta=0.0, batch_size=8, height=None,
             width=None, base_images=None, toy=False, clip_model=None, progress=True, rank=0, world=1):
    """-> {"rewards": {name: {"mean", "se"}}, "structure": {...}, "images": (N, 3, H, W) cpu in [0, 1],
    "scores": {name: (N,) per-image rewards}}. rewards: {name: reward module}, called as reward(images, prompts).
    height, width: the image size in pixels (a run's training size); none = the model's default.
    With world > 1 (torchrun) every process samples and scores every world-th image and the shares are gathered;
    call it on every process. Each image has its own generator for its latents and eta's noise, so the results do
    not depend on batch_size or on the number of processes."""
    assert len(prompts) == len(seeds), (len(prompts), len(seeds))
    mine = list(range(rank, len(prompts), world))
    prompts_mine = [prompts[k] for k in mine]
    generators = [torch.Generator().manual_seed(seeds[k]) for k in mine]  # latents first, then eta's noise
    latents = torch.cat([initial_latents(pipe, 1, g, height, width) for g in generators])  # (n, 4, h, w)
    images = generate(pipe, prompts_mine, latents, ddim_steps, guidance_scale, eta, batch_size, generators, progress)
    device = pipe.denoiser.device
    scores = {name: torch.cat([reward(images[b:b + batch_size].to(device), prompts_mine[b:b + batch_size]).float().cpu()
                               for b in range(0, len(mine), batch_size)]) for name, reward in rewards.items()}
    if world > 1:  # rewards were scored on the float images; the gathered images are 8-bit, as the structure uses
        images, scores = gather(images, scores, rank, world)
    return {"rewards": {name: mean_se(s) for name, s in scores.items()}, "images": images, "scores": scores,
            "structure": structure_of(images, prompts, base_images, toy, clip_model, batch_size)}


def structure_of(images, prompts, base_images=None, toy=False, clip_model=None, batch_size=8):
    """Structure of a stage's images (N, 3, H, W): SSIM (and CLIP cosine) to the base model's images of the same
    prompt and seed, and in the toy world the caption checker's rates. -> {name: {"mean", "se"}, ...}"""
    # Structure is measured on 8-bit images, what a saved PNG holds (our choice): a run's saved base images
    # then give the same numbers as freshly sampled ones, and float noise below 1/255 cannot count as drift.
    q = lambda x: to_uint8(x).float().cpu() / 255
    structure = {}
    if base_images is not None:
        assert base_images.shape == images.shape, (base_images.shape, images.shape)
        structure["ssim"] = mean_se(ssim(q(images), q(base_images)))
        if clip_model is not None:
            cos = torch.cat([(clip_embed(clip_model, q(images[b:b + batch_size])) *
                              clip_embed(clip_model, q(base_images[b:b + batch_size]))).sum(-1)
                             for b in range(0, len(prompts), batch_size)])
            structure["clip"] = mean_se(cos)
    if toy:  # caption fidelity: does image k still show the shape, colour and background its caption asks for?
        import toy as toy_world
        ok = toy_world.check_captions(q(images), prompts)  # {"shape", "colour", "background"}: (N,) bool
        structure["caption"] = {**mean_se((ok["shape"] & ok["colour"] & ok["background"]).float()),
                                **{k: v.float().mean().item() for k, v in ok.items()}}
    return structure

# -----------------------------------------------------------------------------
# RIL metrics (docs/method.md) from the reward matrix R: (T+1) x T, row 0 = base, row i = after task i,
# column j (0-based) = reward of task j+1, so the diagonal "after learning task j+1" is R[j+1][j].

def ril_metrics(matrix, tol=1e-6, scale=None):
    """-> {"gain": (T+1) x T, "forgetting": [F_1..F_T], "average": [A_1..A_T], "warnings": [str]}.
    A 2 x T matrix with T > 1 is a joint run (train_rid.py --method joint: base, then one model trained on every task
    at once): it has no row of its own per task, so its gains need `scale`; F is None and A the mean final gain.
    scale: None = the paper-style normaliser, each task's own gain R[j+1][j] - R[0][j]; or T fixed, method-independent
    normalisers (such as each reward's gain in a single-task reference run, see experiment.py), used instead; a
    column whose fixed normaliser is negative (the reward fell when trained alone: not learnable at that budget) is
    null too, since dividing by it would turn every loss into a gain.
    A column whose own task moved its reward by less than tol (relative to max(1, |R[0][j]|)) has no defined
    normalised gain: its entries are None (null in JSON, never NaN or inf) and it is left out of F and A, with a
    warning. F_1 = None (nothing learned before task 1 can be forgotten), as is any mean over no entries."""
    R = [[float(v) for v in row] for row in matrix]
    T = len(R[0])
    assert T >= 1 and len(R) in (2, T + 1) and all(len(row) == T for row in R), "matrix must be (T+1) x T or 2 x T"
    if len(R) == 2 and T > 1:  # joint
        ok = [scale is not None and float(scale[j]) > tol * max(1.0, abs(R[0][j])) for j in range(T)]
        gain = [[(R[i][j] - R[0][j]) / float(scale[j]) + 0.0 if ok[j] else None for j in range(T)] for i in (0, 1)]
        note = [] if all(ok) else ["joint run (every task at once): a normalised gain needs its reward's gain in a "
                                   "single-task run (experiment.py --frontier), and a column whose gain is missing "
                                   "or not positive is null; the reward matrix holds its results"]
        kept = [g for g in gain[1] if g is not None]
        return {"gain": gain, "forgetting": [None], "average": [sum(kept) / len(kept) if kept else None],
                "warnings": note}
    gain, warnings = [[None] * T for _ in range(T + 1)], []
    for j in range(T):
        own = R[j + 1][j] - R[0][j] if scale is None else float(scale[j])  # the normaliser of column j
        if not abs(own) > tol * max(1.0, abs(R[0][j])):  # `not >` also catches NaN
            warnings.append(f"task {j + 1}: its reward moved by {own:+.3g} from the base model; its normalised "
                            f"gains are undefined (null) and left out of forgetting and average")
            continue
        if own < 0 and scale is not None:
            warnings.append(f"task {j + 1}: its reference gain is negative ({own:+.3g}): not learnable at this budget; "
                            f"its normalised gains are null and left out of forgetting and average")
            continue
        if own < 0:
            warnings.append(f"task {j + 1}: training lowered its own reward ({own:+.3g}); gains of that column "
                            f"are fractions of a loss (1 = the whole loss kept)")
        for i in range(T + 1):
            gain[i][j] = (R[i][j] - R[0][j]) / own + 0.0  # 1 = all of the task's gain kept, 0 = base (+0.0: no -0.0)
    mean = lambda v: sum(v) / len(v) if v else None
    # F_t = mean over earlier tasks of (their best g so far) - (their g now). Column j (task j+1) was learned at row
    # j+1, so its best so far is the max over rows j+1 .. t-1 (docs/method.md: l in [j, t-1] with 1-based tasks).
    forgetting = [mean([max(gain[l][j] for l in range(j + 1, t)) - gain[t][j]
                        for j in range(t - 1) if gain[t][j] is not None]) for t in range(1, T + 1)]
    average = [mean([gain[t][j] for j in range(t) if gain[t][j] is not None]) for t in range(1, T + 1)]
    return {"gain": gain, "forgetting": forgetting, "average": average, "warnings": warnings}

# -----------------------------------------------------------------------------
# Report: results.json, results.md, grid.png, heatmap.png, each written atomically

def font(size=14):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (scalable); older Pillow: a fixed bitmap font
    except TypeError:
        return ImageFont.load_default()


def fmt(d, digits=4):
    """{"mean", "se"} -> 'm ± se'; a plain number or None -> its text or '–'."""
    if d is None:
        return "–"
    if isinstance(d, dict):
        return f"{d['mean']:.{digits}g}" + (f" ± {d['se']:.2g}" if d.get("se") is not None else "")
    return f"{d:.{digits}g}"


def stage_names(results):
    if results.get("method") == "joint":
        return ["base", "joint: all tasks"]
    return ["base"] + [f"{k + 1}: {name}" for k, name in enumerate(results["rewards"])]


def markdown_table(results):
    names, T = results["rewards"], len(results["rewards"])
    structure = results.get("structure") or [{}] * (T + 1)
    columns = {"ssim": "SSIM to base", "clip": "CLIP cosine to base", "caption": "caption match"}
    extra = [k for k in columns if any(k in s for s in structure)]
    head = ["stage", *names, "forgetting F_t", "average gain A_t", *[columns[k] for k in extra]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    se = results.get("matrix_se") or [[None] * T] * (T + 1)
    for i, stage in enumerate(stage_names(results)):
        cells = [fmt({"mean": m, "se": s}) for m, s in zip(results["matrix"][i], se[i])]
        cells += [fmt(results["forgetting"][i - 1]) if i else "–", fmt(results["average"][i - 1]) if i else "–"]
        cells += [fmt(structure[i].get(k)) for k in extra]
        lines.append("| " + " | ".join([stage, *cells]) + " |")
    if results.get("truth"):  # learned toy rewards: each beside its ground truth, and the hacking gap
        names = list(results["truth"][0])
        head = ["stage", *[c for n in names for c in (f"{n} truth", f"{n} hacking gap")]]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, stage in enumerate(stage_names(results)):
            cells = [c for n in names for c in (fmt(results["truth"][i][n]), fmt(results["hacking_gap"][n][i], 3))]
            lines.append("| " + " | ".join([stage, *cells]) + " |")
    return "\n".join(lines + [f"\n> warning: {w}" for w in results.get("warnings", [])]) + "\n"


def labelled_rows(rows, labels, label_w, min_px=96, foot_h=0):
    """Rows of images (R, n, 3, H, W) in one picture, each row's label at its left; tiny images upscaled (nearest) to
    at least min_px. -> (the PIL picture, a drawing context on it, the upscaled image size (sH, sW))"""
    from PIL import Image, ImageDraw
    R, n, _, H, W = rows.shape
    scale = math.ceil(min_px / min(H, W))
    ims = F.interpolate(rows.flatten(0, 1).float(), scale_factor=scale, mode="nearest")  # (R n, 3, sH, sW)
    grid = image_grid(ims, ncol=n, pad=2)
    out = Image.new("RGB", (label_w + grid.width, grid.height + foot_h), "white")
    out.paste(grid, (label_w, 0))
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(labels):
        draw.text((6, 2 + i * (H * scale + 2) + H * scale // 2 - 8), label, fill="black", font=font())
    return out, draw, (H * scale, W * scale)


def draw_grid(results, stage_images, ncol=8):
    """One row per stage, the same first ncol (prompt, seed) pairs in every row."""
    return labelled_rows(torch.stack([s[:ncol] for s in stage_images]), stage_names(results), label_w=130)[0]


def side_by_side(paths, titles, out, gap=24, head_h=34):
    """Pictures (PNG files) next to each other, each with its title above, written atomically to `out`."""
    from PIL import Image, ImageDraw
    ims = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (sum(im.width for im in ims) + gap * (len(ims) - 1), head_h + max(im.height for im in ims)),
                       "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for im, title in zip(ims, titles):
        canvas.paste(im, (x, head_h))
        draw.text((x + 8, 6), title, fill="black", font=font(18))
        x += im.width + gap
    save_png(canvas, out)


def draw_heatmap(results, cell=(96, 44), label_w=130, head_h=52):
    """The normalised gain matrix: blue = the task's gain kept (1), white = back to base (0), red = below base."""
    from PIL import Image, ImageDraw
    gain, names, rows = results["gain"], results["rewards"], stage_names(results)
    img = Image.new("RGB", (max(label_w + cell[0] * len(names), 420), head_h + cell[1] * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 4), "normalised gain g (row: after task i, column: reward j)", fill="black", font=font(13))
    for j, name in enumerate(names):
        draw.text((label_w + j * cell[0] + 6, 30), name, fill="black", font=font())
    for i, label in enumerate(rows):
        draw.text((6, head_h + i * cell[1] + cell[1] // 2 - 8), label, fill="black", font=font())
        for j, g in enumerate(gain[i]):
            a = 0.0 if g is None else min(abs(g), 1.0)  # colour saturates at |g| = 1; the number says the rest
            tint = (40, 90, 200) if g is None or g >= 0 else (200, 40, 40)
            colour = (200, 200, 200) if g is None else tuple(round(255 + a * (c - 255)) for c in tint)
            x0, y0 = label_w + j * cell[0], head_h + i * cell[1]
            draw.rectangle([x0, y0, x0 + cell[0] - 2, y0 + cell[1] - 2], fill=colour, outline=(150, 150, 150))
            draw.text((x0 + 8, y0 + cell[1] // 2 - 8), "n/a" if g is None else f"{g:.2f}",
                      fill="white" if a > 0.6 else "black", font=font())
    return img


def write_report(run_dir, results, stage_images, stage_scores=None):
    """Adds ril_metrics to `results` (in place), writes the four files into run_dir, returns the Markdown table.
    stage_scores: per stage, {reward: (N,) per-image scores}; with them, a toy-world run whose tasks include a learned
    reward also gets its ground truth, hacking gap and hacking.png (hacking())."""
    results.update(ril_metrics(results["matrix"]))
    os.makedirs(run_dir, exist_ok=True)
    pictures = hacking(results, stage_images, stage_scores) if stage_scores else None
    table = markdown_table(results)
    write_json(os.path.join(run_dir, "results.json"), results)
    write_text(os.path.join(run_dir, "results.md"), table)
    save_png(draw_grid(results, stage_images), os.path.join(run_dir, "grid.png"))
    save_png(draw_heatmap(results), os.path.join(run_dir, "heatmap.png"))
    if pictures is not None:
        save_png(pictures, os.path.join(run_dir, "hacking.png"))
    elif os.path.exists(os.path.join(run_dir, "hacking.png")):  # an earlier report's, in an eval.py --out folder
        os.remove(os.path.join(run_dir, "hacking.png"))
    return table

# -----------------------------------------------------------------------------
# Reward hacking (toy world): a learned reward beside its ground truth, computed from the pixels by rule

def truths(names, images, prompts):
    """{name: (N,) ground truth} for the learned toy rewards `names` (toy.py): toyclip -> the fraction of the
    caption's parts the checker finds, toypref -> the hidden preference rule. Measured on 8-bit images, as structure."""
    import toy
    rule = {"toyclip": lambda x: toy.caption_truth(x, prompts), "toypref": toy.preference_truth}
    x = to_uint8(images).float() / 255
    return {n: rule[n](x).float() for n in names}


def hacking(results, stage_images, stage_scores, ncol=8):
    """Adds "truth" (per stage, {reward: {"mean", "se"}}), "hacking_gap" ({reward: [per stage]}) and "hacked_images"
    ({reward: count}) to results for the learned toy rewards among its tasks; returns the picture (or None).
    Hacking gap of reward r with truth g after stage i (our choice of formula):
        gap_i = (mean r_i - mean r_0) / sd_0(r) - (mean g_i - mean g_0) / sd_0(g),
    each gain in units of its spread over the base model's evaluation images (sd_0: per-image standard deviation),
    so that a score in cosine units and a truth in [0, 1] compare. 0 = the score rose as far as its truth; > 0 =
    it rose further (hacking); None where the base spread of either is 0. hacking.png: per learned reward, the final
    stage's images whose score rose while their truth fell, the largest rise first, under their base images."""
    if not is_toy(results["config"]["model"]):
        return None
    from rewards import LEARNED_TOY
    prompts = eval_set(results["config"]["model"], len(stage_images[0]))[0]
    names = [n for n in dict.fromkeys(results["rewards"]) if n in LEARNED_TOY]
    if not names:
        return None
    per_stage = [truths(names, images, prompts) for images in stage_images]
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
        columns += [(n, k, rose[k].item(), fell[k].item()) for k in hacked[rose[hacked].argsort(descending=True)][:ncol].tolist()]
    return draw_hacking(columns, stage_images[0], stage_images[-1]) if columns else None


def draw_hacking(columns, base, final, label_h=44):
    """Two rows (base above, final below) of the images in columns [(reward, k, score rise, truth change)], each
    column's reward, score rise and truth change under it."""
    pick = torch.stack([torch.stack([base[k], final[k]]) for _, k, _, _ in columns], 1)  # (2, n, 3, H, W)
    out, draw, (h, w) = labelled_rows(pick, ("base", "final"), label_w=70, foot_h=label_h)
    y = out.height - label_h
    for c, (name, k, rose, fell) in enumerate(columns):
        x = 70 + c * (w + 2) + 2
        draw.text((x, y + 2), f"{name} #{k}", fill="black", font=font(11))
        draw.text((x, y + 16), f"score {rose:+.3g}", fill=(30, 90, 210), font=font(11))
        draw.text((x, y + 30), f"truth {fell:+.2f}", fill=(200, 40, 40), font=font(11))
    return out

# -----------------------------------------------------------------------------
# CLI: rebuild every stage of a finished run from its saved adapters and recompute its results

def read_run(run):
    """The training-time record of a finished run, checked before anything loads. -> results dict"""
    path = os.path.join(run, "results.json")
    if not os.path.isfile(path):
        raise UserError(f"'{run}' is not a finished run (no results.json); pass a folder written by train_rid.py")
    try:
        with open(path) as f:
            old = json.load(f)
        config, adapters, names, _ = old["config"], old["adapters"], old["rewards"], old["adapter_weights"]
        missing = [k for k in ("model", "eval_n", "eval_batch_size", "ddim_steps", "guidance_scale",
                               "eta") if k not in config]
        assert not missing, f"config lacks {', '.join(missing)}"
        stages = 2 if old.get("method") == "joint" else len(names) + 1
        assert len(adapters) == stages and not adapters[0], "adapters must list base + one stage per task (joint: one)"
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise UserError(f"'{path}' is not a train_rid.py results file ({type(e).__name__}: {e})")
    for folder in dict.fromkeys(sum(adapters, [])):
        check_lora(os.path.join(run, folder))
    return old


def main():
    parser = one_line_errors(argparse.ArgumentParser(description="Recompute a finished rid run's results."))
    parser.add_argument("--run", required=True, help="run folder written by train_rid.py (results.json, adapters/)")
    parser.add_argument("--out", default=None, help="output folder; none = RUN/eval (never RUN itself)")
    parser.add_argument("--device", default=None, help="cuda or cpu; none = the run's config")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype; none = the run's config")
    parser.add_argument("--clip_model", default=None, help="CLIP folder or hub id for CLIP-image drift; none = the one a reward holds, if any")
    args = parser.parse_args()
    # Validate everything before loading a model, so that bad input writes nothing.
    old = read_run(args.run)
    config, adapters, names = old["config"], old["adapters"], old["rewards"]
    out_dir = args.out or os.path.join(args.run, "eval")
    if os.path.realpath(out_dir) == os.path.realpath(args.run):
        raise UserError("--out must not be the run folder itself: its results.json is the training-time record")
    paths = dict(kv.split("=", 1) for kv in config.get("reward_path") or [])
    device, dtype = pick_device_dtype(args.device or config.get("device"), args.dtype or config.get("dtype"))
    pipe = load_pipeline(config["model"], device, dtype)
    try:
        import rewards
        scorers = {name: rewards.load_reward(name, paths.get(name), device, dtype) for name in names}
    except ValueError as e:
        raise UserError(str(e))
    clip_model = clip_at_hand(scorers)
    if args.clip_model:
        from transformers import CLIPModel
        try:
            clip_model = CLIPModel.from_pretrained(args.clip_model, dtype=dtype).to(device).eval()
        except OSError as e:
            raise UserError(f"cannot load --clip_model '{args.clip_model}' ({type(e).__name__}); pass a local folder")
    prompts, seeds = eval_set(config["model"], config["eval_n"])
    height, width = old.get("image_size") or (config.get("height"), config.get("width"))  # the run's size
    settings = dict(ddim_steps=config["ddim_steps"], guidance_scale=config["guidance_scale"], eta=config["eta"],
                    batch_size=config["eval_batch_size"], height=height, width=width, toy=is_toy(config["model"]),
                    clip_model=clip_model)
    # The recomputed results: the training-time record with the measured keys replaced (ril_metrics re-added).
    new = {**old, "matrix": [], "matrix_se": [], "structure": [], "recomputed_from": os.path.abspath(args.run)}
    loaded, stage_images, stage_scores = {}, [], []  # adapter folder -> adapter name; (N, 3, H, W) per stage
    for folder in dict.fromkeys(sum(adapters, [])):  # each folder once, under its own name, before any sampling
        loaded[folder] = f"eval{len(loaded)}"
        load_lora(pipe, os.path.join(args.run, folder), loaded[folder])
    weights = old["adapter_weights"]  # soup: c per adapter; 1 for the others
    for k, stage in enumerate(adapters):
        if stage:
            pipe.denoiser.enable_adapters()
            set_adapters(pipe.denoiser, [loaded[f] for f in stage], weights=weights[k])
        elif loaded:
            pipe.denoiser.disable_adapters()  # the base model
        out = evaluate(pipe, scorers, prompts, seeds, **settings, base_images=stage_images[0] if k else None)
        stage_images.append(out["images"])
        stage_scores.append(out["scores"])
        new["matrix"].append([out["rewards"][n]["mean"] for n in names])
        new["matrix_se"].append([out["rewards"][n]["se"] for n in names])
        new["structure"].append(out["structure"])
    print(write_report(out_dir, new, stage_images, stage_scores))
    diff = max(abs(a - b) for ra, rb in zip(new["matrix"], old["matrix"]) for a, b in zip(ra, rb))
    print(f"wrote results.json, results.md, grid.png, heatmap.png to {out_dir}")
    print(f"largest absolute difference to the training-time reward matrix: {diff:.3g}")


if __name__ == "__main__":
    main()
