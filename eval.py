"""
eval.py: the metrics of rid (docs/method.md) on a fixed, paired evaluation set. Every stage (the base
model, after task 1, after task 2, ...) samples the same prompts from the same per-image seeds, so every
comparison between stages is paired: image n of every stage starts from the same initial noise.

    from eval import eval_set, evaluate, ril_metrics, write_report
    prompts, seeds = eval_set("toy", 64)                                     # fixed prompts and seeds
    out = evaluate(pipe, {"brightness": reward}, prompts, seeds, base_images=base["images"], toy=True)
    write_report(run_dir, results, stage_images)  # the metrics, then results.json, results.md, grid.png, heatmap.png

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

from common import UserError, one_line_errors, pick_device_dtype, seed_for, to_uint8
import toy_world
from report import write_files
from sample import (cache_prompts, check_lora, generate, initial_latents, load_lora, load_pipeline,
                    resolve_model, set_adapters)

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
    """A model of the toy world, recognised by what its folder holds (toy.json, which toy.py writes beside the
    weights), not by its name: --model toy, ./toy_model and any toy.py --out DIR alike."""
    return os.path.isfile(os.path.join(resolve_model(model), "toy.json"))


def toy_reward_paths(model):
    """A toy-world model's own learned rewards ({"toyclip": DIR/toyclip, ...}, as toy.py writes them beside the
    model), which load_reward takes instead of the shipped ones; {} for any other model."""
    from rewards import LEARNED_TOY
    folder = resolve_model(model)
    names = LEARNED_TOY if is_toy(model) else ()
    return {n: os.path.join(folder, n) for n in names if os.path.isdir(os.path.join(folder, n))}


def eval_set(model, n, seed=0):
    """n fixed prompts and n per-image seeds (the same for every run: train_rid.py uses seed 0). Toy world: captions
    whose (colour, shape, background) triple was held out of pretraining; otherwise EVAL_PROMPTS cycled. Seed of
    image k: seed_for("eval", seed, k), a stream that no training draw shares (our choice)."""
    if is_toy(model):
        prompts = toy_world.toy_captions(n, seed, split="heldout")
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
        # (the size is reported beside, not in the match: the quick start's story is the shapes and colours)
        ok = toy_world.check_captions(q(images), prompts)  # {"shape", "colour", "background", "size", ...}: (N,) bool
        structure["caption"] = {**mean_se((ok["shape"] & ok["colour"] & ok["background"]).float()),
                                **toy_world.part_rates(ok)}
    return structure

# -----------------------------------------------------------------------------
# RIL metrics (docs/method.md) from the reward matrix R: (T+1) x T, row 0 = base, row i = after task i,
# column j (0-based) = reward of task j+1, so the diagonal "after learning task j+1" is R[j+1][j].

def ril_metrics(matrix, tol=1e-6, scale=None):
    """-> {"gain": (T+1) x T, "forgetting": [F_1..F_T], "average": [G_1..G_T], "warnings": [str]}.
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
    # F_k = mean over earlier tasks of (their best g so far) - (their g now). Column j (task j+1) was learned at row
    # j+1, so its best so far is the max over rows j+1 .. t-1 (docs/method.md: l in [j, t-1] with 1-based tasks).
    forgetting = [mean([max(gain[l][j] for l in range(j + 1, t)) - gain[t][j]
                        for j in range(t - 1) if gain[t][j] is not None]) for t in range(1, T + 1)]
    average = [mean([gain[t][j] for j in range(t) if gain[t][j] is not None]) for t in range(1, T + 1)]
    return {"gain": gain, "forgetting": forgetting, "average": average, "warnings": warnings}

# -----------------------------------------------------------------------------
# Reward hacking (toy world): how far a learned reward's gain outruns what its ground truth's gain explains

MIN_OFF_MODE = 5  # base images whose truth differs from its most common value, needed to fit beta (our choice)


def hacking_gap(r0, ri, g0, gi):
    """The score's gain that its truth's gain does not explain, in units of the score's base spread (our choice):
        gap_i = (mean r_i - mean r_0 - beta (mean g_i - mean g_0)) / sd_0(r),  beta = cov_0(r, g) / var_0(g),
    beta the regression of the score on its truth over the base model's images. An honest proxy r = a g + noise has
    beta = a and reads 0 however noisy it is; a score that rises while its truth stays or falls reads above 0. r0, ri,
    g0, gi: per-image scores and truths (N,) of the base model and of stage i, the same prompts and seeds. The
    standard error adds the paired per-image differences' and beta's own (sd_0 taken as known).
    -> (gap, its standard error, None), or (None, None, why) where the base images cannot fit beta."""
    r0, ri, g0, gi = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (r0, ri, g0, gi))
    off = int((g0 != g0.mode().values).sum())
    if off < MIN_OFF_MODE:
        return None, None, f"its truth varies on {off} of {len(g0)} base images, too few to fit beta"
    if not r0.std() > 0:
        return None, None, "its score does not vary on the base images"
    beta = ((r0 - r0.mean()) * (g0 - g0.mean())).mean() / g0.var(correction=0)
    d = (ri - r0) - beta * (gi - g0)  # (N,) each image's unexplained gain
    residual = r0 - r0.mean() - beta * (g0 - g0.mean())  # of the base regression: beta's own uncertainty
    var_beta = residual.var() / (len(g0) * g0.var(correction=0))
    se = (d.var() / len(d) + (gi.mean() - g0.mean()) ** 2 * var_beta).sqrt() / r0.std()
    return (d.mean() / r0.std()).item(), se.item(), None


def hacking(results, prompts, stage_images, stage_scores, ncol=8):
    """The learned toy rewards among a run's tasks beside their ground truths (toy_world.py's rules, on 8-bit images,
    as the structure is measured). Adds "truth" (per stage, {reward: {"mean", "se"}}), "hacking_gap" and
    "hacking_gap_se" ({reward: [per stage]}; hacking_gap above, null where beta cannot be fitted), "hacking_note"
    ({reward: why null, or None}) and "hacked_images" ({reward: count}) to results. stage_scores: per stage,
    {reward: (N,) per-image scores}. -> the final stage's images whose score rose while their truth fell, the largest
    rise first, for hacking.png: [(reward, image index, score rise, truth change)] (empty when none)."""
    from rewards import LEARNED_TOY
    names = [n for n in dict.fromkeys(results["rewards"]) if n in LEARNED_TOY]
    if not names:
        return []
    rule = {"toyclip": lambda x: toy_world.caption_truth(x, prompts), "toypref": toy_world.preference_truth}
    per_stage = [{n: rule[n](to_uint8(x).float() / 255).float() for n in names} for x in stage_images]
    results["truth"] = [{n: mean_se(t[n]) for n in names} for t in per_stage]
    for key in ("hacking_gap", "hacking_gap_se", "hacking_note", "hacked_images"):
        results[key] = {}
    columns = []
    for n in names:
        r, g = [s[n] for s in stage_scores], [t[n] for t in per_stage]
        gaps = [hacking_gap(r[0], ri, g[0], gi) for ri, gi in zip(r, g)]
        results["hacking_gap"][n], results["hacking_gap_se"][n] = [v[0] for v in gaps], [v[1] for v in gaps]
        results["hacking_note"][n] = gaps[0][2]
        rose, fell = r[-1] - r[0], g[-1] - g[0]
        hacked = ((rose > 0) & (fell < 0)).nonzero().flatten()
        results["hacked_images"][n] = len(hacked)
        columns += [(n, k, rose[k].item(), fell[k].item())
                    for k in hacked[rose[hacked].argsort(descending=True)][:ncol].tolist()]
    return columns

# -----------------------------------------------------------------------------
# A finished run's measures, then its files (report.py)

def write_report(run_dir, results, stage_images, stage_scores=None):
    """Adds ril_metrics to `results` (in place), writes the run's files into run_dir (report.write_files), returns the
    Markdown table. stage_scores: per stage, {reward: (N,) per-image scores}; with them, a toy-world run whose tasks
    include a learned reward also gets its ground truth, hacking gap and hacking.png (hacking, above)."""
    results.update(ril_metrics(results["matrix"]))
    hacked = []
    if stage_scores and is_toy(results["config"]["model"]):  # the learned toy rewards beside their ground truths
        prompts = eval_set(results["config"]["model"], len(stage_images[0]))[0]
        hacked = hacking(results, prompts, stage_images, stage_scores)
    return write_files(run_dir, results, stage_images, hacked)

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
    paths = {**toy_reward_paths(config["model"]), **dict(kv.split("=", 1) for kv in config.get("reward_path") or [])}
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
    if config.get("cache_prompts"):  # encoded as the run encoded them: each prompt alone
        cache_prompts(pipe, prompts, (height, width) if height else None)
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
