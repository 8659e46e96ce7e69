"""The flag walk: train_rid.py away from the toy's defaults. Every flag that changes what is computed is set to a
non-default value in at least one short run on the tiny models (the walk's runs below, or the shared runs of
conftest.py and test_train.py), and the flags that interact are combined: eta > 0 with grad_accum > 1 and two
processes; a non-default, non-square size with SDXL; v-prediction on a zero-terminal-SNR schedule with rid, K = 2
in bf16, with a prompt-reading reward; a large seed with resume (test_train.py's SIGKILL test).
Each run must finish, write finite results and evaluate at its training size. Then sample.py, eval.py and
experiment.py, a run each."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, RUN, train
from test_train import ADAPTERS_NAN, METHOD_FLAGS, adapters_of

pytestmark = pytest.mark.slow  # every test here runs a script in a subprocess

PROMPTS = ["a red circle", "a green square on white", "a photo of a cat", "wow!!! a blue triangle"]
WALK = {  # run name -> train_rid.py flags (after conftest.RUN: 2 tasks x 3 steps, 4 DDIM steps, 4 evaluation images)
    # Two processes, each with grad_accum 2, eta's noise and RID matched at an extra step: the same results as one
    # process (checked below).
    "torchrun": ["--method", "rid", "--eta", "0.6", "--batch_size", "4", "--grad_accum", "2",
                 "--random_grad_steps", "--guidance_scale", "4", "--max_grad_norm", "0.5", "--lora_rank", "2",
                 "--lora_alpha", "3", "--ema_momentum", "0.9", "--rid_lambda", "2", "--rid_trajectory", "1",
                 "--prompts", "PROMPTS_FILE"],
    # SDXL at a size that is neither its default (32 x 32) nor square; soup; every memory lever (the prompts encoded
    # once: SDXL's time ids of that size come from the cache).
    "sdxl": ["--height", "24", "--width", "40", "--method", "soup", "--soup_weight", "0.7", "--checkpoint_decode",
             "--checkpoint_reward", "--no_checkpointing", "--cache_prompts", "--eval_batch_size", "3", "--save_every",
             "2", "--rewards", "contrast,warmth"],
    # v-prediction on a zero-terminal-SNR schedule, RID with K = 2 (a second student call at the detached x_t), bf16, and a
    # reward that reads the prompt (a CLIP stand-in), in its own units.
    "vpred": ["--method", "rid", "--grad_steps", "2", "--ddim_steps", "5", "--dtype", "bfloat16",
              "--rewards", "clip,brightness", "--reward_path", "clip=CLIP_STANDIN", "--no_reward_norm",
              "--guidance_scale", "1"],
}
# Flags no walk run needs to set: they change no result, or a test elsewhere sets them (named here).
NOT_WALKED = {
    "--model": "every run (tiny SD, tiny SDXL, a v-prediction copy)", "--out": "a folder, not a computation",
    "--device": "cpu only here", "--overwrite": "test_toy.py, test_errors.py",
    "--resume": "test_train.py (SIGKILL, stop at a task's end)", "--baseline": "test_train.py::test_toy_model_defaults",
    "--log": "test_train.py (tensorboard, wandb)", "--compile": "bench.py --compile (docs/speed_and_memory.md)",
}  # --dtype float16 (with its loss scaler) runs in test_train.py::test_fp16_trains_with_a_loss_scaler


@pytest.fixture(scope="module")
def walk(tiny_sd, tiny_sdxl, tmp_path_factory):
    """name -> (run folder, flags, completed process) of each walk run, trained on first use."""
    from test_rewards import tiny_clip
    from test_sample import SCHEDULERS, variant
    root = tmp_path_factory.mktemp("walk")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    vpred = variant(tiny_sd, root, scheduler=SCHEDULERS["v_zero_snr"])
    tiny_clip(str(root / "clip"), seed=3)
    models = {"torchrun": tiny_sd, "sdxl": tiny_sdxl, "vpred": vpred}
    done = {}

    def get(name, launcher=None, out=None, extra=()):
        """extra: flags after the walk's own (later flags win, as in argparse)."""
        key = (name, out)
        if key not in done:
            flags = [{"PROMPTS_FILE": str(root / "prompts.txt"), "clip=CLIP_STANDIN": f"clip={root / 'clip'}"}.get(a, a)
                     for a in WALK[name]] + list(extra)
            folder = root / (out or name)
            done[key] = folder, flags, train(models[name], folder, *flags, method=None, launcher=launcher)
        return done[key]
    return get


def check_run(folder, r, size):
    """Finished, finite, and evaluated at the training size: results.json says so, and so do the PNGs."""
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(folder / "results.json"))
    values = [v for row in res["matrix"] for v in row] + [s[k]["mean"] for s in res["structure"] for k in s]
    assert values and all(math.isfinite(v) for v in values), res["matrix"]
    assert res["image_size"] == list(size)
    for stage in range(len(res["matrix"])):
        assert Image.open(folder / "samples" / f"stage{stage}" / "000.png").size == (size[1], size[0])  # (W, H)
    assert torch.load(folder / "samples" / "stage1.pt", weights_only=True).shape[-2:] == size
    assert all(torch.isfinite(v).all() for a in adapters_of(folder).values() for v in a.values())
    return res


def test_two_processes_with_eta_and_accumulation_equal_one(walk):
    """torchrun, 2 CPU processes x 2 micro-batches of 1 image, eta 0.6 (per-image noise generators), against one
    process with 4 micro-batches of 1: the same per-step statistics, adapters, reward matrix and images."""
    two, flags, r = walk("torchrun", launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                               "--standalone"])  # a free port, chosen by torchrun
    check_run(two, r, (32, 32))
    one, _, r1 = walk("torchrun", out="torchrun_one", extra=["--grad_accum", "4"])  # micro-batches of 1 again
    assert r1.returncode == 0, r1.stderr[-3000:]
    logs = [[json.loads(line) for line in open(run / "log.jsonl")] for run in (one, two)]
    assert len(logs[0]) == len(logs[1]) == 6
    # Step by step the all-reduced statistics equal one process's: to 1e-6 at the first step (float order only), and
    # within 1% later (3% for the gradient norm), where Adam can turn float-order noise on a near-zero gradient into a
    # visible change (1.5% seen in the gradient norm of the last step). Unsynced gradients (each process stepping on
    # its own half batch) would log half the reward sum at once, a gradient norm about half or 1/sqrt(2) as large,
    # and move the weights apart by far more.
    for n, (x, y) in enumerate(zip(*logs)):
        for key in ("reward", "loss_reward", "loss_rid", "grad_norm"):
            rel = 1e-6 if n == 0 else 3e-2 if key == "grad_norm" else 1e-2
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-7), (x["task"], x["step"], key)
    a, b = adapters_of(one), adapters_of(two)
    for d in a:  # each adapter as a whole (one element of a rank-2 B moved by 2e-4 in one run: the Adam effect above)
        diff = sum((b[d][k] - a[d][k]).pow(2).sum() for k in a[d]).sqrt()
        assert diff <= 1e-2 * sum(a[d][k].pow(2).sum() for k in a[d]).sqrt(), d
    ref, got = (json.load(open(run / "results.json")) for run in (one, two))
    np.testing.assert_allclose(got["matrix"], ref["matrix"], rtol=1e-3)  # the Adam effect again: 2.5e-4 seen
    for k in range(4):  # every evaluation image, sampled by one of the two processes with its own eta noise
        x, y = (np.asarray(Image.open(run / "samples" / "stage0" / f"{k:03d}.png")).astype(int) for run in (one, two))
        assert np.abs(x - y).max() <= 1
    assert ref["config"]["prompts"].endswith("prompts.txt") and ref["config"]["eta"] == 0.6


def test_sdxl_at_a_non_square_size_evaluates_at_that_size(walk, tmp_path):
    """Training at 24 x 40 px on SDXL (default 32 x 32): the evaluation, the reward scales, SSIM and every picture
    are at 24 x 40 too; eval.py --run rebuilds the run at that size and gets the same matrix."""
    folder, _, r = walk("sdxl")
    res = check_run(folder, r, (24, 40))
    assert "24x40 px" in r.stdout and res["adapter_weights"][-1] == [0.7, 0.7]
    e = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--run", str(folder), "--out",
                        str(tmp_path / "again")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert e.returncode == 0, e.stderr[-3000:]
    again = json.load(open(tmp_path / "again" / "results.json"))
    np.testing.assert_allclose(again["matrix"], res["matrix"], rtol=1e-5, atol=1e-6)


def test_v_prediction_rid_with_a_window_of_two_in_bf16(walk):
    """A zero-terminal-SNR v-prediction copy of the tiny model (the first step's alpha-bar is 0): RID with K = 2 and
    bf16 networks with fp32 LoRA weights, a CLIP reward that reads the prompt."""
    folder, _, r = walk("vpred")
    res = check_run(folder, r, (32, 32))
    log = [json.loads(line) for line in open(folder / "log.jsonl")]
    assert all(row["finite"] for row in log) and [row["loss_rid"] == 0 for row in log] == [True, False, False] * 2
    assert res["train"]["unet_calls_per_image_step"] == {"forward": 5 + 2 + 2 + 1 * 2, "backward": 2 + 1}
    assert res["train"]["reward_scales"] == [1.0, 1.0] and "bfloat16" in r.stdout


def test_every_flag_that_changes_a_result_is_walked():
    """The flags of train_rid.py --help, each set to a non-default value by some run, or named in NOT_WALKED."""
    import re
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_rid.py"), "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    flags = set(re.findall(r"(--\w+)", r.stdout)) - {"--help"}
    runs = [*WALK.values(), RUN, *METHOD_FLAGS.values(), ADAPTERS_NAN]
    walked = {a for run in runs for a in run if a.startswith("--")}
    missing = sorted(flags - walked - set(NOT_WALKED))
    assert not missing, f"flags no run sets (walk them, or say in NOT_WALKED why not): {missing}"
    assert len(flags) > 30  # the help text was parsed


def test_sample_cli_away_from_its_defaults_matches_diffusers(tiny_sd, tmp_path):
    """sample.py at a non-square size, eta 0.5, no guidance, a 63-bit seed, on the zero-SNR v-prediction copy:
    the same images as StableDiffusionPipeline with the same settings and seed."""
    from test_sample import SCHEDULERS, reference_pipeline, variant
    folder = variant(tiny_sd, tmp_path, scheduler=SCHEDULERS["v_zero_snr"])
    seed = 2**63 - 1
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model", folder, "--prompt", PROMPTS[0],
                        "--prompt", PROMPTS[1], "--height", "24", "--width", "40", "--eta", "0.5", "--guidance_scale",
                        "1", "--seed", str(seed), "--ddim_steps", "6", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ours = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{k:03d}.png")).astype(int) for k in range(2)])
    ref = reference_pipeline(folder)(PROMPTS[:2], height=24, width=40, eta=0.5, guidance_scale=1.0,
                                     num_inference_steps=6, generator=torch.Generator().manual_seed(seed)).images
    ref = np.stack([np.asarray(im).astype(int) for im in ref])
    assert ours.shape == ref.shape == (2, 24, 40, 3) and ours.std() > 10
    assert np.abs(ours - ref).max() <= 1
