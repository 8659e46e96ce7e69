"""
report.py: a run's results as the files people read, each written atomically: results.json, results.md (the Markdown
tables), grid.png (one row of evaluation images per stage), heatmap.png (the normalised gain matrix), hacking.png
(learned toy rewards: the images whose score rose while their ground truth fell), and compare.png (two runs' grids
side by side, the quick start's picture). What is measured lives in eval.py; this file only lays it out.

    from report import write_files
    table = write_files(run_dir, results, stage_images, hacked)   # results with eval.ril_metrics in it -> the table
"""
import math
import os

import torch
import torch.nn.functional as F

from common import image_grid, save_png, write_json, write_text

# -----------------------------------------------------------------------------
# Tables: numbers as text

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
    """The reward matrix with forgetting, average gain and the structure measures, one row per stage; for learned toy
    rewards a second table of their ground truths and hacking gaps; then the metrics' warnings."""
    names, T = results["rewards"], len(results["rewards"])
    structure = results.get("structure") or [{}] * (T + 1)
    columns = {"ssim": "SSIM to base", "clip": "CLIP cosine to base", "caption": "caption match"}
    extra = [k for k in columns if any(k in s for s in structure)]
    # the toy world's size part, beside the caption match (which reads shape, colour and background)
    size = any(s.get("caption", {}).get("size") is not None for s in structure)
    head = ["stage", *names, "forgetting F_k", "average gain G_k", *[columns[k] for k in extra]] + \
        ["size match"] * size
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    se = results.get("matrix_se") or [[None] * T] * (T + 1)
    for i, stage in enumerate(stage_names(results)):
        cells = [fmt({"mean": m, "se": s}) for m, s in zip(results["matrix"][i], se[i])]
        cells += [fmt(results["forgetting"][i - 1]) if i else "–", fmt(results["average"][i - 1]) if i else "–"]
        cells += [fmt(structure[i].get(k)) for k in extra] + [fmt(structure[i].get("caption", {}).get("size"))] * size
        lines.append("| " + " | ".join([stage, *cells]) + " |")
    if results.get("truth"):  # learned toy rewards: each beside its ground truth, and the hacking gap
        names = list(results["truth"][0])
        head = ["stage", *[c for n in names for c in (f"{n} truth", f"{n} hacking gap")]]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        se = results.get("hacking_gap_se") or {}
        gap = lambda n, i: None if results["hacking_gap"][n][i] is None else {  # the gap, ± its standard error
            "mean": results["hacking_gap"][n][i], "se": se[n][i] if n in se else None}
        for i, stage in enumerate(stage_names(results)):
            cells = [c for n in names for c in (fmt(results["truth"][i][n]), fmt(gap(n, i), 3))]
            lines.append("| " + " | ".join([stage, *cells]) + " |")
    notes = [f"{n}: no hacking gap, {why}" for n, why in (results.get("hacking_note") or {}).items() if why]
    return "\n".join(lines + [f"\n> warning: {w}" for w in results.get("warnings", []) + notes]) + "\n"

# -----------------------------------------------------------------------------
# Pictures: PIL images of the stages, the gains and the hacked images

def font(size=14):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (scalable); older Pillow: a fixed bitmap font
    except TypeError:
        return ImageFont.load_default()


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
# The files of a run

def write_files(run_dir, results, stage_images, hacked=()):
    """results.json, results.md, grid.png, heatmap.png (and hacking.png when `hacked` lists images) in run_dir.
    results: a run's record with eval.ril_metrics (and eval.hacking's measures) in it; stage_images: per stage,
    (N, 3, H, W) in [0, 1]; hacked: [(reward, image index, score rise, truth change)] (eval.hacking). -> the table."""
    os.makedirs(run_dir, exist_ok=True)
    table = markdown_table(results)
    write_text(os.path.join(run_dir, "results.md"), table)
    save_png(draw_grid(results, stage_images), os.path.join(run_dir, "grid.png"))
    save_png(draw_heatmap(results), os.path.join(run_dir, "heatmap.png"))
    picture = os.path.join(run_dir, "hacking.png")
    if hacked:
        save_png(draw_hacking(hacked, stage_images[0], stage_images[-1]), picture)
    elif os.path.exists(picture):  # an earlier report's, in an eval.py --out folder
        os.remove(picture)
    # Last: results.json marks a run finished (train_rid.py --resume, the baseline beside a run, experiment.py), so a
    # kill before this line leaves a run that --resume completes, never a "finished" one without its pictures.
    write_json(os.path.join(run_dir, "results.json"), results)
    return table


# -----------------------------------------------------------------------------
# The method as a picture (docs/method.md's), drawn from code as the run's pictures are

INK, GREY, ORANGE, BLUE, RED = "black", (225, 225, 225), (255, 205, 150), (40, 90, 200), (200, 40, 40)


def box(d, x, y, w, h, lines, fill, dashed=False, colour=INK, size=14):
    """A labelled box on drawing d; dashed: short strokes along its sides (PIL draws no dashed outline)."""
    if dashed:
        for a in range(x, x + w, 12):
            d.line([(a, y), (min(a + 6, x + w), y)], fill=colour, width=2)
            d.line([(a, y + h), (min(a + 6, x + w), y + h)], fill=colour, width=2)
        for a in range(y, y + h, 12):
            d.line([(x, a), (x, min(a + 6, y + h))], fill=colour, width=2)
            d.line([(x + w, a), (x + w, min(a + 6, y + h))], fill=colour, width=2)
    else:
        d.rectangle([x, y, x + w, y + h], fill=fill, outline=colour, width=2)
    for i, line in enumerate(lines):
        d.text((x + 8, y + 6 + i * (size + 4)), line, fill=colour, font=font(size))


def arrow(d, x0, y0, x1, y1, colour=INK, width=2):
    d.line([(x0, y0), (x1, y1)], fill=colour, width=width)
    n = max(1.0, math.hypot(x1 - x0, y1 - y0))
    ux, uy = (x1 - x0) / n, (y1 - y0) / n
    d.polygon([(x1, y1), (x1 - 10 * ux + 5 * uy, y1 - 10 * uy - 5 * ux),
               (x1 - 10 * ux - 5 * uy, y1 - 10 * uy + 5 * ux)], fill=colour)


def draw_method(K=2):
    """One training step of task k, from the initial noise z through the S - K steps without a graph, the K
    grad-window steps (each with its EMA teacher at the same x_t), the decode and the reward, and where each loss
    term enters and the gradient flows. -> a PIL image"""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (1360, 560), "white")
    d, y, x = ImageDraw.Draw(im), 70, 440
    d.text((20, 14), f"One training step of task k (here K = {K}): the denoiser is W0 + dW_1 + ... + dW_(k-1) (frozen) "
           "+ dW_k = (alpha / r) B A (trained)", fill=INK, font=font(17))
    box(d, 20, y, 110, 60, ["z ~ N(0, I)", "initial noise"], "white")
    arrow(d, 130, y + 30, 160, y + 30)
    box(d, 160, y, 250, 60, ["S - K steps without a graph", "(no_grad): time, no memory"], GREY)
    arrow(d, 410, y + 30, x, y + 30)
    for i in range(K):  # each window step, its teacher below it, both outputs into L_rid
        box(d, x, y, 190, 60, [f"window step {i + 1} of K: grad,", "blocks checkpointed"], ORANGE)
        box(d, x + 60, y + 150, 130, 60, ["EMA teacher,", "no grad"], None, dashed=True, colour=BLUE)
        arrow(d, x + 125, y + 60, x + 125, y + 150, colour=BLUE)  # x_t goes to the teacher (detached)
        d.text((x + 130, y + 95), "same x_t", fill=BLUE, font=font(12))
        arrow(d, x + 30, y + 60, x + 30, y + 260)  # the student's own raw output at x_t
        d.text((x + 35, y + 125), "eps_student", fill=INK, font=font(12))
        arrow(d, x + 125, y + 210, x + 125, y + 260, colour=BLUE)
        arrow(d, x + 190, y + 30, x + 220, y + 30)
        x += 220
    box(d, x, y, 150, 60, ["VAE decode", "(with grad)"], ORANGE)
    arrow(d, x + 150, y + 30, x + 180, y + 30)
    rx = x + 180
    box(d, rx, y, 160, 60, ["reward r_k", "images in [0, 1]"], ORANGE)
    box(d, rx - 40, y + 260, 250, 60, ["L_reward = -mean r_k / s_k", "(s_k: r_k's spread at the base)"], "white")
    arrow(d, rx + 80, y + 60, rx + 80, y + 260)
    box(d, 440, y + 260, 2 * 220 - 30, 60, ["L_rid = mean (eps_student - sg(eps_teacher))^2",
                                            "over the K steps, both guidance branches, all elements"], "white",
        colour=BLUE)
    box(d, 560, y + 370, 520, 50, ["L = L_reward + lambda * L_rid   ->   backward into dW_k only"], (255, 235, 235),
        colour=RED, size=16)
    arrow(d, 440 + 205, y + 320, 700, y + 370)
    arrow(d, rx + 80, y + 320, 940, y + 370)
    d.line([(rx + 80, y - 12), (452, y - 12)], fill=RED, width=3)  # the gradient, right to left, over the forward
    arrow(d, 460, y - 12, 448, y - 12, colour=RED, width=3)
    d.text((470, y - 32), "gradient: back through the reward, the decode and the K window steps only (earlier steps "
           "are constants: a truncated, biased gradient)", fill=RED, font=font(12))
    d.text((20, y + 440), "After optimizer.step(): the teacher's A and B follow the student's, "
           "A_ema <- m A_ema + (1 - m) A. At a task's first step B = 0, so the teacher is the model after task k - 1 "
           "and L_rid = 0.", fill=INK, font=font(14))
    return im
