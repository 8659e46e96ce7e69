"""
experiment.py: the RIL experiment. Runs train_rid.py for several methods and seeds on the same task sequence
(one subprocess per run, one after another), then writes one comparison table with mean and spread over seeds.

    python experiment.py --out runs/experiment                     # naive, adapters, rid x 3 seeds on the toy world
    python experiment.py --out runs/ablation --methods rid --vary rid_lambda=0.1,1,10   # an ablation
    python experiment.py --out runs/experiment -- --lr 3e-4         # flags after -- go to every train_rid.py run

A finished run is reused and an interrupted one resumed, so the command can simply be run again after a kill.
Per method it reports, from each run's results.json (definitions in RID.md section 5 and eval.py):
  F_T        forgetting after the last task (normalised gains; lower is better)
  A_T        average normalised gain after the last task (higher is better)
  new task   how much each task raised its own reward while it was trained, R[t][t] - R[t-1][t], averaged over
             tasks, in reward units and relative to naive's: "learns each new task nearly as well"
  SSIM, caption   structure after the last task against the base model's images (caption: toy world only)
  s/step     median wall time of an optimiser step
Writes OUT/table.md, OUT/summary.json and OUT/grid_<name>.png (the grid of each method's first seed).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

from sample import UserError, atomic_file, one_line_errors
from toy import TOY_REWARDS

parser = one_line_errors(argparse.ArgumentParser(description="Compare RIL methods over seeds."))
parser.add_argument("--out", default="runs/experiment", help="folder for all runs and the comparison table")
parser.add_argument("--model", default="toy", help="model of every run (hub id, folder or 'toy')")
parser.add_argument("--rewards", default=TOY_REWARDS, help="the task sequence of every run")
parser.add_argument("--methods", default="naive,adapters,rid", help="methods to compare, comma-separated")
parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (evaluation set is fixed)")
parser.add_argument("--vary", default=None, help="ablation: KEY=v1,v2,... a train_rid.py flag to sweep")
parser.add_argument("--iters", type=int, default=None, help="optimiser steps per task of every run; none = train_rid.py's")
parser.add_argument("--batch_size", type=int, default=None, help="images per optimiser step of every run; none = train_rid.py's")
parser.add_argument("--eval_n", type=int, default=None, help="evaluation images of every run; none = train_rid.py's")
args, extra = parser.parse_known_args()
extra = [a for a in extra if a != "--"]
seeds = [int(s) for s in args.seeds.split(",")]
methods = args.methods.split(",")
variants = [(None, None)]
if args.vary:
    key, _, values = args.vary.partition("=")
    if not values:
        raise UserError(f"--vary '{args.vary}' must be KEY=v1,v2,... (a train_rid.py flag and its values)")
    variants = [(key, v) for v in values.split(",")]

# -----------------------------------------------------------------------------
# Runs: one train_rid.py per (method, variant, seed); reuse finished ones, resume interrupted ones.

def run(method, key, value, seed):
    name = method if key is None else f"{method}_{key}={value}"
    folder = os.path.join(args.out, name, f"seed{seed}")
    if os.path.isfile(os.path.join(folder, "results.json")):
        return name, folder
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_rid.py"),
           "--model", args.model, "--rewards", args.rewards, "--method", method, "--seed", str(seed),
           "--out", folder, *[a for flag in ("iters", "batch_size", "eval_n") if getattr(args, flag) is not None
                              for a in (f"--{flag}", str(getattr(args, flag)))],
           *extra, *([f"--{key}", value] if key else [])]
    if os.path.isfile(os.path.join(folder, "checkpoint.pt")):
        cmd.append("--resume")
    print(f"\n=== {name}, seed {seed}: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"run {folder} failed (its own error is above); fix it and run this command again")
    return name, folder


runs = {}  # name -> [run folder per seed]
for method in methods:
    for key, value in variants:
        for seed in seeds:
            name, folder = run(method, key, value, seed)
            runs.setdefault(name, []).append(folder)

# -----------------------------------------------------------------------------
# Table: mean and spread (sample std over seeds) of each measure, per method.

results = {f: json.load(open(os.path.join(f, "results.json"))) for folders in runs.values() for f in folders}


def measures(res):
    R, T, last = res["matrix"], len(res["rewards"]), res["structure"][-1]
    return {"F_T": res["forgetting"][-1] if T > 1 else None, "A_T": res["average"][-1],
            "new task": statistics.mean(R[t][t - 1] - R[t - 1][t - 1] for t in range(1, T + 1)),
            "SSIM": last["ssim"]["mean"], "caption": last.get("caption", {}).get("mean"),
            "s/step": statistics.mean(res["train"]["seconds_per_step"])}


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


per_run = {f: measures(res) for f, res in results.items()}
summary = {name: {k: mean_sd([per_run[f][k] for f in folders]) for k in
                  ("F_T", "A_T", "new task", "SSIM", "caption", "s/step")} for name, folders in runs.items()}
reference = summary.get("naive", {}).get("new task", (None,))[0]
c = next(iter(results.values()))["config"]  # the settings as run (the first run's; --vary's key differs per row)
lines = [f"RIL on `{args.model}`, tasks {args.rewards.replace(',', ' -> ')}, {c['iters']} steps of {c['batch_size']} "
         f"images per task, {c['ddim_steps']} DDIM steps, K={c['grad_steps']}, lr {c['lr']}, {c['eval_n']} evaluation "
         f"images, seeds {args.seeds}"
         + (f", extra flags `{' '.join(extra)}`" if extra else "")
         + (f", `{args.vary.split('=')[0]}` as in each row" if args.vary else "")
         + " (mean ± sd over seeds)", "",
         "| method | F_T (lower is better) | A_T | new-task gain | vs naive | SSIM to base | caption match | s/step |",
         "|---|---|---|---|---|---|---|---|"]
for name, row in summary.items():
    cell = lambda k, d=3: "–" if row[k][0] is None else f"{row[k][0]:.{d}f} ± {row[k][1]:.{d}f}"
    ratio = f"{row['new task'][0] / reference:.2f}" if reference else "–"
    lines.append(f"| {name} | {cell('F_T')} | {cell('A_T')} | {cell('new task', 4)} | {ratio} | {cell('SSIM')} | "
                 f"{cell('caption')} | {cell('s/step', 2)} |")
table = "\n".join(lines) + "\n"
with atomic_file(os.path.join(args.out, "table.md")) as tmp, open(tmp, "w") as f:
    f.write(table)
with atomic_file(os.path.join(args.out, "summary.json")) as tmp, open(tmp, "w") as f:
    json.dump({"summary": summary, "runs": runs, "extra": extra}, f, indent=1)
for name, folders in runs.items():
    shutil.copyfile(os.path.join(folders[0], "grid.png"), os.path.join(args.out, f"grid_{name}.png"))
print("\n" + table)
