"""experiment.py: its tables and its frontier against hand-computed examples (run folders written here, which
experiment.py reuses as finished runs), and one real train_rid.py run launched by it on the tiny SD folder."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from eval import ril_metrics

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CONFIG = {"iters": 2, "batch_size": 2, "ddim_steps": 3, "grad_steps": 1, "lr": 0.02, "eval_n": 2}


def experiment(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiment.py"), *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd)


def fake_run(folder, matrix, ssim, caption, rewards=("brightness", "saturation"), seconds=1.0, **more):
    """A finished run's results.json, as train_rid.py writes it, for a given reward matrix (more: extra keys)."""
    os.makedirs(folder, exist_ok=True)
    T = len(rewards)
    res = {"rewards": list(rewards), "matrix": matrix, "config": CONFIG, **more,
           "structure": [{}] + [{"ssim": {"mean": ssim}, "caption": {"mean": caption}}] * (len(matrix) - 1),
           "train": {"seconds_per_step": [seconds] * T, "seconds_total": [2 * seconds] * T,
                     "unet_calls_per_image_step": {"forward": 5, "backward": 1}}, **ril_metrics(matrix)}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(res, f)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(os.path.join(folder, "grid.png"))


def test_frontier_against_a_hand_computed_example(tmp_path):
    """Two tasks; base rewards (0.5, 0.4); reference gains 0.2 (brightness alone) and 0.4 (saturation alone).
    naive iters=1: R = [[.5,.4],[.6,.4],[.55,.6]] -> new-task gain mean(.1/.2, .2/.4) = 0.5; g after task 2 =
      (.25, .5): F_2 = .5 - .25 = 0.25, final gain 0.75; SSIM .8, caption .9
    naive iters=2: R = [[.5,.4],[.7,.35],[.5,.8]] -> new-task gain mean(1, .45/.4) = 1.0625; F_2 = 1 - 0 = 1.0
    rid lambda=1:  R = [[.5,.4],[.62,.4],[.6,.64]] -> new-task gain 0.6; F_2 = .6 - .5 = 0.1; SSIM .85, caption .95
      naive's curve at 0.6: t = (0.6 - 0.5) / 0.5625 = 0.17778: F 0.38333, SSIM 0.72889, caption 0.82889, so RID's
      F is 0.28333 lower and SSIM and caption 0.12111 higher: it wins
    rid lambda=0.1: R = [[.5,.4],[.7,.4],[.45,.8]] -> new-task gain 1.0, F_2 = 1 - (-.25) = 1.25; naive's curve at
      1.0: F 0.91667, so +0.33333: it does not win.
    joint: R = [[.5,.4],[.66,.7]] -> final gain .16/.2 + .3/.4 = 1.55, no new-task gain or F; SSIM .7, caption .8:
      rid lambda=1 is 0.45 below it in final gain and 0.15 above in SSIM and caption; naive iters=1 0.8 below.
    rid lambda=1 carries a hacking gap of 0.3 after its last task."""
    out = tmp_path / "fr"
    fake_run(out / "reference" / "brightness" / "seed0", [[0.5], [0.7]], 1, 1, rewards=("brightness",))
    fake_run(out / "reference" / "saturation" / "seed0", [[0.4], [0.8]], 1, 1, rewards=("saturation",))
    fake_run(out / "naive" / "iters=1" / "seed0", [[0.5, 0.4], [0.6, 0.4], [0.55, 0.6]], 0.8, 0.9)
    fake_run(out / "naive" / "iters=2" / "seed0", [[0.5, 0.4], [0.7, 0.35], [0.5, 0.8]], 0.4, 0.5)
    fake_run(out / "rid" / "rid_lambda=1" / "seed0", [[0.5, 0.4], [0.62, 0.4], [0.6, 0.64]], 0.85, 0.95,
             hacking_gap={"toyclip": [0.0, 0.1, 0.3]})
    fake_run(out / "rid" / "rid_lambda=0.1" / "seed0", [[0.5, 0.4], [0.7, 0.4], [0.45, 0.8]], 0.45, 0.5)
    fake_run(out / "joint" / "default" / "seed0", [[0.5, 0.4], [0.66, 0.7]], 0.7, 0.8, method="joint")
    r = experiment("--frontier", "--out", str(out), "--rewards", "brightness,saturation", "--methods", "naive,rid,joint",
                   "--seeds", "0", "--knob", "naive=iters:1,2", "--knob", "rid=rid_lambda:1,0.1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "=== " not in r.stdout  # every run existed: nothing trained
    fig = json.load(open(out / "frontier.json"))["figures"]["brightness,saturation"]
    assert fig["reference_gains"] == pytest.approx([0.2, 0.4])
    points = {(m, v): s for m, pts in fig["points"].items() for v, s in pts}
    naive1, naive2, rid1, rid01 = points["naive", "1"], points["naive", "2"], points["rid", "1"], points["rid", "0.1"]
    assert naive1["new task"][0] == pytest.approx(0.5) and naive2["new task"][0] == pytest.approx(1.0625)
    assert naive1["F"][0] == pytest.approx(0.25) and naive2["F"][0] == pytest.approx(1.0)
    assert naive1["final gain"][0] == pytest.approx(0.75) and rid1["final gain"][0] == pytest.approx(1.1)
    assert rid1["new task"][0] == pytest.approx(0.6) and rid1["F"][0] == pytest.approx(0.1)
    assert rid01["F"][0] == pytest.approx(1.25)
    assert rid1["F own"][0] == pytest.approx(ril_metrics([[0.5, 0.4], [0.62, 0.4], [0.6, 0.64]])["forgetting"][-1])
    text = (out / "frontier.md").read_text()
    assert "| rid | rid_lambda=1 | 0.600 | -0.283 | +0.121 | +0.121 | – | yes |" in text, text
    assert "| rid | rid_lambda=0.1 | 1.000 | +0.333 |" in text and text.count("| no |") == 1
    joint = points["joint", None]
    assert joint["final gain"][0] == pytest.approx(1.55) and joint["new task"][0] is None and joint["F"][0] is None
    assert "| rid | rid_lambda=1 | -0.450 | +0.150 | +0.150 |" in text and "| naive | iters=1 | -0.800 | +0.100 | +0.100 |" in text
    assert rid1["hacking gap"][0] == pytest.approx(0.3) and naive1["hacking gap"][0] is None
    assert "| joint | – |" in text
    from PIL import Image
    assert Image.open(out / "frontier.png").size[0] >= 900  # three panels side by side


def test_table_mode_against_a_hand_computed_example(tmp_path):
    """Table mode over two seeds: new-task gains (0.2, 0.4) and (0.3, 0.2) in reward units -> per run 0.3 and 0.25,
    mean 0.275, sd 0.0354; F (own normaliser) of the two runs 0.75 and 1/3 -> mean 0.5417, sd 0.2946."""
    out = tmp_path / "tab"
    fake_run(out / "naive" / "seed0", [[0.5, 0.4], [0.7, 0.4], [0.55, 0.8]], 0.5, 0.6)   # F = 1 - .25 = .75
    fake_run(out / "naive" / "seed1", [[0.5, 0.4], [0.8, 0.4], [0.7, 0.6]], 0.7, 0.8)    # F = 1 - 2/3 = 1/3
    r = experiment("--out", str(out), "--rewards", "brightness,saturation", "--methods", "naive", "--seeds", "0,1",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))["summary"]["naive"]
    assert summary["new task"] == pytest.approx([0.275, 0.0353553], abs=1e-6)
    assert summary["F own"] == pytest.approx([(0.75 + 1 / 3) / 2, 0.2946278], abs=1e-6)
    assert "| naive | 0.542 ± 0.295 |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_experiment_trains_what_is_missing_and_reuses_what_is_there(tiny_sd, tmp_path):
    args = ["--model", tiny_sd, "--rewards", "brightness", "--methods", "naive", "--seeds", "5", "--out", "exp",
            "--iters", "1", "--batch_size", "2", "--eval_n", "2", "--", "--ddim_steps", "2", "--eval_batch_size", "2",
            "--lr", "0.02"]
    r = experiment(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("=== ") == 1
    res = json.load(open(tmp_path / "exp" / "naive" / "seed5" / "results.json"))  # any seed, not only 0 to 4
    assert res["config"]["lr"] == 0.02 and res["config"]["ddim_steps"] == 2  # flags after -- arrive
    table = (tmp_path / "exp" / "table.md").read_text()
    again = experiment(*args, cwd=tmp_path)
    assert again.returncode == 0 and "=== " not in again.stdout and (tmp_path / "exp" / "table.md").read_text() == table
    # Asked with another budget, the finished run is refused, never reused: its flags are named (the run records
    # the flags it was made with); the same with the budget left to train_rid.py's default.
    for changed, word in (([a if a != "1" else "2" for a in args], "--iters 1 there, 2 now"),
                          (args[:10] + args[12:], "--iters 1 there, (not given) now")):
        r = experiment(*changed, cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr
        assert "=== " not in r.stdout


def test_parallel_runs_write_logs_beside_their_folders_and_a_failure_names_its_log(tmp_path):
    """--jobs 2: each run's output goes to FOLDER.log; a run that fails (here: no such model folder) stops the
    experiment with one line that points at that log, which holds train_rid.py's own error."""
    r = experiment("--frontier", "--jobs", "2", "--model", "no_such_model", "--rewards", "brightness", "--methods",
                   "naive", "--seeds", "0,1", "--knob", "naive=iters:1", "--out", "exp", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and ".log" in r.stderr, r.stderr
    log = re.search(r"its own error is in (\S+\.log)\)", r.stderr).group(1)
    assert log in ("exp/reference/brightness/seed0.log", "exp/reference/brightness/seed1.log"), log
    assert "no_such_model" in (tmp_path / log).read_text()
    assert not any(n.endswith("seed0") or n.endswith("seed1") for _, dirs, _ in os.walk(tmp_path) for n in dirs)


@pytest.mark.parametrize("args, word", [(["--vary", "rid_lambda"], "KEY=v1,v2"), (["--knob", "rid"], "NAME=KEY"),
                                        (["--frontier", "--vary", "lr=1"], "two modes"), (["--seeds", "0,-1"], "--seeds"),
                                        (["--seeds", "1,x"], "--seeds")])
def test_experiment_bad_input_is_one_line(args, word, tmp_path):
    r = experiment(*args, "--out", "exp", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr
    assert not os.listdir(tmp_path)
