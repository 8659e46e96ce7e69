"""
experiment.py: the RIL experiment. Runs train_rid.py for several methods and seeds on the same task sequence (one
subprocess per run, one after another) and compares them. Two modes:

  table     (default) each method at its defaults, mean ± sd over seeds; --vary sweeps one flag (an ablation)
  frontier  (--frontier) each method as a curve over its one knob (naive: steps per task, rid: lambda, ...), on one
            or more task sequences, against a method-independent normaliser: frontier.png, frontier.md, frontier.json

    python experiment.py --out runs/experiment                                  # naive, adapters, rid x 3 seeds
    python experiment.py --out runs/ablation --methods rid --vary rid_lambda=0.1,1,10    # an ablation
    python experiment.py --frontier --out runs/frontier \\
        --rewards contrast,saturation,brightness --rewards brightness,warmth,contrast --jobs 2  # the README's picture
    python experiment.py --out runs/experiment -- --lr 3e-4       # flags after -- go to every train_rid.py run

A finished run is reused and an interrupted one resumed, so a command can simply be run again after a kill.
The measures, from each run's results.json (definitions in docs/method.md):
  new-task gain  how much each task raised its own reward while it was trained, R[t][t] - R[t-1][t], averaged over
                 tasks; divided by the reference gain of that reward (below), so 1 = as much as training it alone
  F_T, G_T       forgetting and average gain after the last task on the reference-normalised gains; the paper-style
                 ones (normalised by each task's own gain) are reported beside them, labelled "own"
  final gain     the final model's reference-normalised gains summed over all tasks
                 (a reward whose reference gain is not positive is not learnable at the budget: it is left out of
                 the normalised measures, and its raw score and hacking gap speak for it)
  hacking gap    for learned toy rewards (toyclip, toypref): the final model's gain in the reward that the gain in
                 its ground truth does not explain, in the reward's base spread (eval.hacking_gap), averaged over
                 them; > 0 = hacked, 0 for an honest proxy
  joint          (--method joint) every task at once with the same total budget: a point on the final-gain panels,
                 and each method's distance to it
  SSIM, caption  structure after the last task against the base model's images (caption: toy world only)
The reference gain of a reward is its gain from the base model in a single-task run with the same budget and the
same seeds (train_rid.py --rewards NAME, each seed), run once and cached in OUT/reference/: it does not depend on the
method being judged, so a method that learns little cannot inflate its own gains.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

from common import UserError, check_seed, one_line_errors, save_png, write_json, write_text
from toy_world import TOY_REWARDS

# The knob of each method's curve and its values on the toy world (our choice). Every other setting is the same
# for every method: train_rid.py's defaults.
FRONTIER = {
    "naive": ("iters", [3, 6, 10, 20]),          # naive stopped early: steps per task
    "l2": ("l2_weight", [0.01, 0.03]),
    "soup": ("soup_weight", [0.33, 1.0]),        # each adapter's weight in the soup; 1 = the sum
    "rid": ("rid_lambda", [1, 3, 10]),           # lambda 0 would be `adapters`
    "adapters": ("iters", [6, 20]),              # rid's lambda = 0, stopped early or not
    "joint": (None, [None]),                     # every task at once, the same total budget: one point, the upper
}                                                # reference on the final-gain panels
FRONTIER_DEFAULT = "naive,adapters,l2,soup,rid,joint"

parser = one_line_errors(argparse.ArgumentParser(description="Compare RIL methods over seeds."))
parser.add_argument("--out", default="runs/experiment", help="folder for all runs and the comparison")
parser.add_argument("--model", default="toy", help="model of every run (hub id, folder or 'toy')")
parser.add_argument("--rewards", action="append", default=None, help="a task sequence; repeat for more sequences "
                    f"(default {TOY_REWARDS})")
parser.add_argument("--methods", default=None, help="methods to compare, comma-separated (default naive,adapters,rid; "
                    "with --frontier naive,adapters,l2,soup,rid,joint)")
parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (evaluation set is fixed)")
parser.add_argument("--vary", default=None, help="ablation: KEY=v1,v2,... a train_rid.py flag to sweep")
parser.add_argument("--frontier", action="store_true", help="curves over each method's knob (see FRONTIER)")
parser.add_argument("--knob", action="append", default=[], help="with --frontier: NAME=KEY:v1,v2,... replaces that "
                    "curve's knob; NAME is a method, or METHOD/VARIANT for a second curve of it; repeat")
parser.add_argument("--flags", action="append", default=[], help="with --frontier: NAME=\"--flag value ...\", fixed "
                    "train_rid.py flags of one curve (a variant such as rid/frozen=\"--ema_momentum 1\"); repeat")
parser.add_argument("--reference", default=None, help="folder of the single-task reference runs; none = OUT/reference")
parser.add_argument("--jobs", type=int, default=1, help="with --frontier: runs at a time; each gets cores/jobs "
                    "threads and writes its output to FOLDER.log beside its folder (1 = one after another, output here)")
parser.add_argument("--iters", type=int, default=None, help="optimiser steps per task of every run; none = train_rid.py's")
parser.add_argument("--batch_size", type=int, default=None, help="images per optimiser step of every run; none = train_rid.py's")
parser.add_argument("--eval_n", type=int, default=None, help="evaluation images of every run; none = train_rid.py's")
args, extra = parser.parse_known_args()
if args.jobs < 1 or (args.jobs > 1 and not args.frontier):
    raise UserError(f"--jobs {args.jobs}: must be at least 1, and above 1 only with --frontier")
extra = [a for a in extra if a != "--"]
try:
    seeds = [check_seed("--seeds", int(s)) for s in args.seeds.split(",")]
except ValueError:
    raise UserError(f"--seeds '{args.seeds}' must be comma-separated integers from 0 to 2^64 - 1, such as 0,1,2")
sequences = args.rewards or [TOY_REWARDS]
methods = (args.methods or (FRONTIER_DEFAULT if args.frontier else "naive,adapters,rid")).split(",")
curves = {m: FRONTIER.get(m, (None, [None])) for m in methods}  # curve name -> (knob, values)
for item in args.knob:
    name, _, spec = item.partition("=")
    key, _, values = spec.partition(":")
    if not (name and key and values):
        raise UserError(f"--knob '{item}' must be NAME=KEY:v1,v2,... (for example rid=rid_lambda:0.1,1)")
    curves[name] = (key, values.split(","))
fixed = {}  # curve name -> its fixed flags
for item in args.flags:
    name, _, flags = item.partition("=")
    if name not in curves:
        raise UserError(f"--flags '{item}': '{name}' is not a curve; add it with --knob {name}=KEY:v1,v2,...")
    fixed[name] = flags.split()
for name in curves:
    if name.split("/")[0] not in ("naive", "adapters", "rid", "l2", "soup", "joint"):
        raise UserError(f"curve '{name}': the part before '/' must be a train_rid.py --method")
reference_dir = args.reference or os.path.join(args.out, "reference")
variants = [(None, None)]
if args.vary:
    key, _, values = args.vary.partition("=")
    if not values:
        raise UserError(f"--vary '{args.vary}' must be KEY=v1,v2,... (a train_rid.py flag and its values)")
    variants = [(key, v) for v in values.split(",")]
if args.frontier and args.vary:
    raise UserError("--frontier and --vary are two modes; pass one (a frontier's knobs are set with --knob)")

# -----------------------------------------------------------------------------
# Runs: one train_rid.py per (sequence, method, knob value, seed); reuse finished ones, resume interrupted ones.

def flag_values(argv):
    """A train_rid.py command line's flags -> {flag: value} (a bare flag: True)."""
    values, i = {}, 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        if key.startswith("--") and not eq:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
            i += value is not True
        if key.startswith("--"):
            values[key] = value
        i += 1
    return values


def same(a, b):
    """Two flag values alike: equal, or the same number written two ways (3e-4 and 0.0003)."""
    if a == b or isinstance(a, bool) or isinstance(b, bool):
        return a == b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def same_flags(folder, argv):
    """A run folder is reused (finished) or resumed only if it was made with the flags asked for now, as its
    config.json records them ("command"); otherwise one line names the flags that differ."""
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f).get("command")
    if saved is None:
        raise UserError(f"run folder '{folder}' does not record the flags it was made with; delete it to train it "
                        f"again, or choose another --out")
    was, now = flag_values(saved), flag_values(argv)
    differ = sorted(k for k in was.keys() | now.keys() if k not in ("--out", "--resume", "--overwrite")
                    and not same(was.get(k), now.get(k)))
    if differ:
        what = "; ".join(f"{k} {was.get(k, '(not given)')} there, {now.get(k, '(not given)')} now" for k in differ)
        raise UserError(f"run folder '{folder}' was made with other flags ({what}); choose another --out (or "
                        f"--reference), or delete the folder to train it again")


def run(folder, rewards, method, seed, flags=(), plan=None):
    """Train one run unless it is finished; with plan (a list), only note it there, to run later in seed order. A
    folder made with other flags is refused (same_flags), never reused."""
    given = {flag: getattr(args, flag) for flag in ("iters", "batch_size", "eval_n") if getattr(args, flag) is not None}
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_rid.py"),
           "--model", args.model, "--rewards", rewards, "--method", method, "--seed", str(seed), "--out", folder,
           "--baseline", "none",
           *[a for k, v in given.items() for a in (f"--{k}", str(v))], *extra, *flags]
    if os.path.isfile(os.path.join(folder, "config.json")):
        same_flags(folder, cmd[2:])
    if os.path.isfile(os.path.join(folder, "results.json")):
        return folder
    if plan is not None:
        plan.append((seed, folder, rewards, method, tuple(flags)))
        return folder
    if os.path.isfile(os.path.join(folder, "checkpoint.pt")):
        cmd.append("--resume")
    print(f"\n=== {folder}: {' '.join(cmd[1:])}", flush=True)
    if args.jobs == 1:
        ok = subprocess.run(cmd).returncode == 0
    else:  # parallel runs: each on its share of the cores, its output in its own log
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                               str(max(1, (os.cpu_count() or 1) // args.jobs)))}
        with open(folder + ".log", "a") as log:  # beside the folder: train_rid.py wants its folder new
            ok = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode == 0
        print(f"=== {folder}: {'done' if ok else 'FAILED'}", flush=True)
    if not ok:
        where = "above" if args.jobs == 1 else f"in {folder}.log"
        raise UserError(f"run {folder} failed (its own error is {where}); fix it and run this command again")
    return folder


def load(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def reference_runs(rewards, plan=None):
    return {name: [run(os.path.join(reference_dir, name, f"seed{s}"), name, "adapters", s, plan=plan) for s in seeds]
            for name in rewards.split(",")}


def reference_gains(rewards):
    """Each reward's gain from the base model when trained alone (same budget, each seed), averaged over seeds."""
    return [statistics.mean(r["matrix"][1][0] - r["matrix"][0][0] for r in map(load, folders))
            for folders in reference_runs(rewards).values()]

# -----------------------------------------------------------------------------
# Measures of one run, and their mean and spread over seeds.

def measures(res, ref=None):
    """ref: the reference gains of the sequence's rewards (None: raw reward units, no normalised measures)."""
    from eval import ril_metrics
    R, T, last = res["matrix"], len(res["rewards"]), res["structure"][-1]
    scale, joint = ref or [1.0] * T, res.get("method") == "joint"  # joint: base and one final row, no task of its own
    m = ril_metrics(R, scale=ref) if ref else None
    # a reward that fell when trained alone (reference gain not positive) has no normalised gain: left out (eval.py)
    learnable = [j for j in range(T) if m is None or m["gain"][0][j] is not None]
    gaps = [v[-1] for v in (res.get("hacking_gap") or {}).values() if v[-1] is not None]
    out = {"new task": None if joint or not learnable else
           statistics.mean((R[j + 1][j] - R[j][j]) / scale[j] for j in learnable),
           "F own": res["forgetting"][-1] if T > 1 else None, "A own": res["average"][-1],
           "hacking gap": statistics.mean(gaps) if gaps else None,
           "SSIM": last["ssim"]["mean"], "caption": last.get("caption", {}).get("mean"),
           "s/step": statistics.mean(res["train"]["seconds_per_step"]),
           "train s": sum(res["train"]["seconds_total"])}
    calls = res["train"].get("unet_calls_per_image_step")
    out["UNet calls"] = calls["forward"] + 2 * calls["backward"] if calls else None  # a backward ~ 2 forwards
    if ref:
        out.update({"F": m["forgetting"][-1] if T > 1 else None, "A": m["average"][-1],
                    "final gain": sum(m["gain"][-1][j] for j in learnable)})
    else:
        out["final gain"] = None
    return out


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(folders, ref=None):
    per_run = [measures(load(f), ref) for f in folders]
    return {k: mean_sd([m[k] for m in per_run]) for k in per_run[0]}


def cell(v, d=3):
    return "–" if v is None or v[0] is None else f"{v[0]:.{d}f} ± {v[1]:.{d}f}"


def header(rewards, first):
    c = load(first)["config"]  # the settings as run (the first run's)
    return (f"RIL on `{args.model}`, tasks {rewards.replace(',', ' -> ')}, {c['iters']} steps of {c['batch_size']} "
            f"images per task, {c['ddim_steps']} DDIM steps, K={c['grad_steps']}, lr {c['lr']}, {c['eval_n']} evaluation "
            f"images, seeds {args.seeds}" + (f", extra flags `{' '.join(extra)}`" if extra else "") +
            " (mean ± sd over seeds)")

# -----------------------------------------------------------------------------
# Table mode: each method (and --vary value) at its defaults.

def table_mode(rewards, out):
    runs = {}
    for method in methods:
        for key, value in variants:
            name = method if key is None else f"{method}_{key}={value}"
            flags = [f"--{key}", value] if key else []
            runs[name] = [run(os.path.join(out, name, f"seed{s}"), rewards, method, s, flags) for s in seeds]
    summary = {name: summarise(folders) for name, folders in runs.items()}
    reference = summary.get("naive", {}).get("new task", (None,))[0]
    lines = [header(rewards, next(iter(runs.values()))[0]) + (f"; `{args.vary.split('=')[0]}` as in each row"
                                                               if args.vary else ""), "",
             "| method | F_T (lower is better) | G_T | new-task gain | vs naive | SSIM to base | caption match | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        ratio = f"{row['new task'][0] / reference:.2f}" if reference and row["new task"][0] is not None else "–"
        lines.append(f"| {name} | {cell(row['F own'])} | {cell(row['A own'])} | {cell(row['new task'], 4)} | {ratio} | "
                     f"{cell(row['SSIM'])} | {cell(row['caption'])} | {cell(row['s/step'], 2)} |")
    table = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "table.md"), table)
    write_json(os.path.join(out, "summary.json"), {"summary": summary, "runs": runs, "extra": extra})
    for name, folders in runs.items():
        shutil.copyfile(os.path.join(folders[0], "grid.png"), os.path.join(out, f"grid_{name}.png"))
    return table

# -----------------------------------------------------------------------------
# Frontier mode: a curve per method over its knob, against the reference gains; naive's curve read at RID's points.

def interpolate(curve, x):
    """Linear interpolation of [(x, y), ...] (sorted by x) at x; None outside the curve's range."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if min(x0, x1) <= x <= max(x0, x1) and x0 != x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def versus_naive(naive, s, k, x):
    """Point s's measure k minus naive's curve [(new-task gain, summary)] read at new-task gain x; None where
    either is missing or x lies outside the curve."""
    curve = [(a, b[k][0]) for a, b in naive]
    if x is None or s[k][0] is None or any(a is None or y is None for a, y in curve):
        return None
    at = interpolate(curve, x)
    return None if at is None else s[k][0] - at


def curve_runs(rewards, out, plan=None):
    """{curve name: [(knob value, [run folder per seed])]} of one sequence."""
    runs = {}
    for name, (key, values) in curves.items():
        for value in values:
            flags = [*fixed.get(name, []), *([f"--{key}", str(value)] if key else [])]
            point = f"{key}={value}" if key else "default"  # a curve without a knob (joint): one point
            runs.setdefault(name, []).append((value, [run(os.path.join(out, name, point, f"seed{s}"), rewards,
                                                          name.split("/")[0], s, flags, plan) for s in seeds]))
    return runs


def frontier_mode(rewards, out):
    ref = reference_gains(rewards)
    runs = curve_runs(rewards, out)
    points = {name: [(value, summarise(folders, ref)) for value, folders in row] for name, row in runs.items()}
    # the header's settings from a run at the common budget (not one with a curve over iters)
    first = next((row[0][1][0] for name, row in runs.items() if curves[name][0] != "iters"),
                 next(iter(runs.values()))[0][1][0])
    lines = [header(rewards, first),
             "Reference gains (single-task runs): " + ", ".join(f"{n} {g:+.4f}" for n, g in zip(rewards.split(","), ref)),
             "", "| method | knob | new-task gain | F_T | F_T own | G_T | final gain | SSIM to base | caption match | "
             "hacking gap | UNet calls per image and step | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    knob = lambda method, value: f"{curves[method][0]}={value}" if curves[method][0] else "–"
    for method, row in points.items():
        for value, s in row:  # (method here is the curve's name)
            lines.append(f"| {method} | {knob(method, value)} | {cell(s['new task'])} | {cell(s['F'])} | "
                         f"{cell(s['F own'])} | {cell(s['A'])} | {cell(s['final gain'])} | {cell(s['SSIM'])} | "
                         f"{cell(s['caption'])} | {cell(s['hacking gap'])} | {cell(s['UNet calls'], 0).split(' ±')[0]} | "
                         f"{cell(s['train s'], 0)} |")
    verdicts = []
    if "naive" in points:
        naive = sorted(((s["new task"][0], s) for _, s in points["naive"]), key=lambda p: p[0])  # ties: keep order
        for method in [m for m in points if m not in ("naive", "joint")]:
            for value, s in points[method]:
                x = s["new task"][0]
                diff = {k: versus_naive(naive, s, k, x) for k in ("F", "caption", "SSIM", "hacking gap")}
                if diff["F"] is None:
                    continue
                wins = diff["F"] <= -0.1 and all(diff[k] is None or diff[k] >= 0.05 for k in ("caption", "SSIM"))
                verdicts.append(f"| {method} | {knob(method, value)} | {x:.3f} | {diff['F']:+.3f} | " +
                                " | ".join("–" if diff[k] is None else f"{diff[k]:+.3f}" for k in ("caption", "SSIM",
                                                                                                   "hacking gap")) +
                                f" | {'yes' if wins else 'no'} |")
    if verdicts:
        lines += ["", "Against naive stopped early at the same new-task gain (naive's curve interpolated); wins = F_T at "
                  "least 0.1 lower and caption match and SSIM at least 0.05 higher (the hacking gap is shown, not judged):",
                  "", "| method | knob | new-task gain | F_T - naive's | caption - naive's | SSIM - naive's | hacking gap - "
                  "naive's | wins |", "|---|---|---|---|---|---|---|---|", *verdicts]
    if "joint" in points:  # how far each final model is from training on every task at once
        ref_point = points["joint"][0][1]
        away = lambda s, k: "–" if s[k][0] is None or ref_point[k][0] is None else f"{s[k][0] - ref_point[k][0]:+.3f}"
        lines += ["", "Each final model against joint training (every task at once, the same total budget; final gain "
                  f"{cell(ref_point['final gain'])}):", "",
                  "| method | knob | final gain - joint's | caption - joint's | SSIM - joint's |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {knob(m, value)} | {away(s, 'final gain')} | {away(s, 'caption')} | {away(s, 'SSIM')} |"
                  for m, row in points.items() if m != "joint" for value, s in row]
    return "\n".join(lines) + "\n", {"reference_gains": ref, "points": points}


PANELS = [("new task", "F", "new-task gain", "forgetting F_T"), ("final gain", "caption", "final gain (sum)",
          "caption match"), ("final gain", "SSIM", "final gain (sum)", "SSIM to base")]
COLOURS = {"naive": (200, 40, 40), "adapters": (240, 150, 30), "l2": (120, 80, 180), "soup": (40, 150, 60),
           "rid": (30, 90, 210), "joint": (0, 0, 0)}
MORE = [(0, 170, 200), (120, 120, 120), (200, 60, 160), (110, 70, 20)]  # variants' curves, in order
colour_of = lambda name: COLOURS.get(name) or MORE[[n for n in curves if n not in COLOURS].index(name) % len(MORE)]


def draw_frontier(figures, path, panel=(330, 260), margin=(56, 34, 14, 40)):
    """One row of three panels per sequence: mean points joined in knob order, error bars = sd over seeds."""
    from PIL import Image, ImageDraw
    from report import font
    left, top, right, bottom = margin
    W, H = panel
    img = Image.new("RGB", (len(PANELS) * W, len(figures) * (H + 20) + 28), "white")
    draw = ImageDraw.Draw(img)
    for m, name in enumerate(curves):  # legend
        draw.line([(10 + 130 * m, 14), (34 + 130 * m, 14)], fill=colour_of(name), width=3)
        draw.text((40 + 130 * m, 6), name, fill="black", font=font(13))
    for row, (rewards, fig) in enumerate(figures.items()):
        y0 = 28 + row * (H + 20)
        draw.text((8, y0), rewards.replace(",", " -> "), fill="black", font=font(12))
        for col, (xk, yk, xlabel, ylabel) in enumerate(PANELS):
            x0 = col * W
            series = {m: [(v, s) for v, s in pts if s[xk][0] is not None and s[yk][0] is not None]
                      for m, pts in fig["points"].items()}
            vals = [(s[xk], s[yk]) for pts in series.values() for _, s in pts]
            if not vals:
                continue
            lo_x = min(x[0] - x[1] for x, _ in vals); hi_x = max(x[0] + x[1] for x, _ in vals)
            lo_y = min(y[0] - y[1] for _, y in vals); hi_y = max(y[0] + y[1] for _, y in vals)
            pad_x, pad_y = 0.05 * (hi_x - lo_x or 1), 0.05 * (hi_y - lo_y or 1)
            lo_x, hi_x, lo_y, hi_y = lo_x - pad_x, hi_x + pad_x, lo_y - pad_y, hi_y + pad_y
            px = lambda v: x0 + left + (v - lo_x) / (hi_x - lo_x) * (W - left - right)
            py = lambda v: y0 + top + (hi_y - v) / (hi_y - lo_y) * (H - top - bottom)
            draw.rectangle([px(lo_x), py(hi_y), px(hi_x), py(lo_y)], outline=(120, 120, 120))
            for v in (lo_x + pad_x, hi_x - pad_x):
                draw.text((px(v) - 14, py(lo_y) + 3), f"{v:.2f}", fill="black", font=font(11))
            for v in (lo_y + pad_y, hi_y - pad_y):
                draw.text((x0 + 4, py(v) - 7), f"{v:.2f}", fill="black", font=font(11))
            draw.text((px((lo_x + hi_x) / 2) - 40, py(lo_y) + 16), xlabel, fill="black", font=font(12))
            draw.text((x0 + left + 4, y0 + top - 16), ylabel, fill="black", font=font(12))
            for method, pts in series.items():
                colour = colour_of(method)
                xy = [(px(s[xk][0]), py(s[yk][0])) for _, s in pts]
                if len(xy) > 1:
                    draw.line(xy, fill=colour, width=2)
                for (value, s), (x, y) in zip(pts, xy):
                    draw.line([(px(s[xk][0] - s[xk][1]), y), (px(s[xk][0] + s[xk][1]), y)], fill=colour)
                    draw.line([(x, py(s[yk][0] - s[yk][1])), (x, py(s[yk][0] + s[yk][1]))], fill=colour)
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
                    if value is not None:
                        draw.text((x + 4, y - 12), str(value), fill=colour, font=font(10))  # the knob's value
    save_png(img, path)


os.makedirs(args.out, exist_ok=True)
out_of = lambda rewards: os.path.join(args.out, rewards.replace(",", "-")) if len(sequences) > 1 else args.out
if args.frontier:  # every missing run, seed by seed: after each seed the picture can be drawn from what is done
    plan = []
    for rewards in sequences:
        reference_runs(rewards, plan)
        curve_runs(rewards, out_of(rewards), plan)
    plan = sorted(dict.fromkeys(plan), key=lambda p: p[0])
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(args.jobs)
    try:  # list() re-raises the first failure; the runs not yet started are then cancelled
        list(pool.map(lambda p: run(p[1], p[2], p[3], p[0], p[4]), plan))
    finally:
        pool.shutdown(cancel_futures=True)
texts, figures = [], {}
for rewards in sequences:
    out = out_of(rewards)
    if args.frontier:
        text, figures[rewards] = frontier_mode(rewards, out)
    else:
        text = table_mode(rewards, out)
    texts.append(text)
report = "\n".join(texts)
if args.frontier:
    write_text(os.path.join(args.out, "frontier.md"), report)
    write_json(os.path.join(args.out, "frontier.json"), {"curves": curves, "figures": figures, "extra": extra})
    draw_frontier(figures, os.path.join(args.out, "frontier.png"))
print("\n" + report)
