"""train_rid.py end to end, as a user runs it: subprocess runs on the tiny SD folder of conftest.py with
weight-free rewards, checking the run folder's artifacts, stock-diffusers loading of the adapters, resume after
SIGKILL, torchrun with two processes, and the non-finite guard."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT

# Small but real: 2 tasks x 4 steps, 6 DDIM steps, K=2, one extra matched step, 4 evaluation images.
RUN = ["--rewards", "brightness,saturation", "--iters", "4", "--ddim_steps", "6", "--grad_steps", "2",
       "--batch_size", "2", "--eval_n", "4", "--eval_batch_size", "2", "--lr", "0.02", "--match_steps", "1",
       "--save_every", "1", "--lora_alpha", "8"]


def train(tiny_sd, out, *extra, method="rid", wait=True, launcher=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "train_rid.py"), "--model", tiny_sd, "--out", str(out),
                                            "--method", method, *RUN, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)


def adapters_of(run):
    return {d: load_file(os.path.join(run, "adapters", d, "pytorch_lora_weights.safetensors"))
            for d in sorted(os.listdir(os.path.join(run, "adapters")))}


@pytest.fixture(scope="module")
def rid_run(tiny_sd, tmp_path_factory):
    """One uninterrupted rid run, shared by the tests below (the reference for resume and torchrun)."""
    out = tmp_path_factory.mktemp("runs") / "rid"
    r = train(tiny_sd, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_run_folder_holds_results_adapters_and_pictures(rid_run):
    out, stdout = rid_run
    res = json.load(open(out / "results.json"))
    assert res["rewards"] == ["brightness", "saturation"] and res["method"] == "rid"
    assert np.array(res["matrix"]).shape == (3, 2)  # base, after task 1, after task 2
    assert len(res["forgetting"]) == len(res["average"]) == 2 and len(res["structure"]) == 3
    assert res["adapters"] == [[], ["adapters/task1_brightness"], ["adapters/task1_brightness", "adapters/task2_saturation"]]
    for f in ("results.md", "grid.png", "heatmap.png", "log.jsonl", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert "| base |" in stdout  # the table is printed at the end
    # The task's reward went up on its own task (lr is high, so 4 steps move it).
    assert res["matrix"][1][0] > res["matrix"][0][0]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 8 and all(row["finite"] for row in log) and all(row["loss_rid"] >= 0 for row in log)


def test_toy_model_defaults(tmp_path):
    """--model toy alone picks the toy world's task sequence and CPU-sized defaults, and trains the shipped model."""
    from toy import TOY_REWARDS
    out = tmp_path / "toy"
    cmd = [sys.executable, os.path.join(ROOT, "train_rid.py"), "--model", "toy", "--out", str(out), "--iters", "1",
           "--eval_n", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["rewards"] == TOY_REWARDS.split(",") and len(res["matrix"]) == 4
    assert (res["config"]["batch_size"], res["config"]["ddim_steps"], res["config"]["eval_batch_size"]) == (8, 20, 64)
    # held-out captions, so the caption checker measures structure; the base model follows them
    assert res["structure"][0]["caption"]["mean"] >= 0.75


def test_adapters_load_in_stock_pipeline_and_reproduce_evaluation(rid_run, tiny_sd):
    """The composed adapters of the last stage, loaded by diffusers' own load_lora_weights, give the images
    train_rid evaluated (to 1 level of 255)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from eval import eval_set
    out, _ = rid_run
    res = json.load(open(out / "results.json"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for k, folder in enumerate(res["adapters"][-1]):
        pipe.load_lora_weights(str(out / folder), adapter_name=f"a{k}")
        names.append(f"a{k}")
    pipe.set_adapters(names)
    prompts, seeds = eval_set(tiny_sd, 4, 0)
    for k, (prompt, seed) in enumerate(zip(prompts, seeds)):
        ref = np.asarray(pipe(prompt, num_inference_steps=6, guidance_scale=7.5,
                              generator=torch.Generator().manual_seed(seed)).images[0]).astype(int)
        ours = np.asarray(Image.open(out / "samples" / "stage2" / f"{k:03d}.png")).astype(int)
        assert np.abs(ref - ours).max() <= 1
    base = np.asarray(Image.open(out / "samples" / "stage0" / "000.png")).astype(int)
    assert np.abs(base - np.asarray(Image.open(out / "samples" / "stage2" / "000.png")).astype(int)).max() > 1


def test_resume_after_sigkill_equals_uninterrupted_run(rid_run, tiny_sd, tmp_path):
    """Kill the run with SIGKILL at random moments (three times, some during task 2), resume each time: the final
    results and adapters equal the uninterrupted run's bit for bit (all randomness is a function of seed, task
    and step, and the checkpoint holds weights, EMA teacher and optimiser state)."""
    ref_out, _ = rid_run
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    proc = train(tiny_sd, out, wait=False)
    while kills < 3:
        # Wait until the run is inside training (log lines exist), then kill at a random moment.
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            log = out / "log.jsonl"
            lines = open(log).read().count("\n") if log.exists() else 0
            if lines >= 2 + 2 * kills:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.6))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        proc = train(tiny_sd, out, "--resume", wait=False)
    assert proc.wait(timeout=300) == 0
    assert kills >= 2, "the run finished before it could be killed twice"
    ref, got = json.load(open(ref_out / "results.json")), json.load(open(out / "results.json"))
    for key in ("matrix", "matrix_se", "structure", "gain", "forgetting", "average", "adapters"):
        assert got[key] == ref[key], key
    a, b = adapters_of(ref_out), adapters_of(out)
    assert a.keys() == b.keys()
    for d in a:
        for k in a[d]:
            assert torch.equal(a[d][k], b[d][k]), (d, k)
    leftovers = [f for d in ("", "adapters", "samples") for f in os.listdir(out / d) if ".tmp" in f or ".old" in f]
    assert not leftovers  # what interrupted writes left behind is cleaned up on resume


def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(tiny_sd, tmp_path):
    out = tmp_path / "ctrlc"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_rid.py"), "--model", tiny_sd, "--out", str(out),
                             *RUN, "--iters", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and open(out / "log.jsonl").read().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stdout and "Traceback" not in stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["task"] == 0 and ckpt["step"] >= 2


def test_torchrun_two_processes_equal_one(rid_run, tiny_sd, tmp_path):
    """Two CPU processes (gloo), each with half of the global batch, give the adapters of one process."""
    ref_out, _ = rid_run
    out = tmp_path / "ddp"
    r = train(tiny_sd, out, launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                      "--master_port", str(29500 + os.getpid() % 1000)])
    assert r.returncode == 0, r.stderr[-3000:]
    # Step by step, the all-reduced statistics equal one process's: an unsynced gradient (each process stepping on
    # its own half batch) would change the logged gradient norm, reward and teacher loss at once.
    one, two = ([json.loads(line) for line in open(run / "log.jsonl")] for run in (ref_out, out))
    assert len(one) == len(two) == 8
    for x, y in zip(one, two):
        for key in ("reward", "loss_reward", "loss_rid", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), (x["task"], x["step"], key)
    a, b = adapters_of(ref_out), adapters_of(out)
    assert a.keys() == b.keys()
    for d in a:
        for k in a[d]:
            # Per-process batches of 1 instead of 2 change float summation orders (~1e-7 relative, see above).
            # Adam divides each gradient element by its own running scale, so an element whose gradient is near
            # zero can turn that into a visible difference: 2.6e-4 was seen on one of 64 weights on an AMD EPYC.
            # Each Adam step moves a weight by up to lr = 0.02; unsynced gradients differ by that order.
            torch.testing.assert_close(b[d][k], a[d][k], rtol=1e-3, atol=1e-3)
    ref, got = json.load(open(ref_out / "results.json")), json.load(open(out / "results.json"))
    np.testing.assert_allclose(got["matrix"], ref["matrix"], rtol=1e-4)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_sd, tmp_path):
    out = tmp_path / "nan"
    r = train(tiny_sd, out, "--fault_nan_steps", "1,5", method="adapters")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["train"]["skipped_steps"] == [1, 1]  # global step 1 is in task 1, step 5 in task 2
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["finite"] for row in log] == [True, False, True, True, True, False, True, True]
    # Several in a row: the run stops with one clear line, and what it saved is finite.
    out2 = tmp_path / "nan_stop"
    r = train(tiny_sd, out2, "--fault_nan_steps", "1,2,3", "--max_nonfinite", "3", method="adapters")
    last = r.stderr.strip().splitlines()[-1]  # (the progress bars above it also go to stderr)
    assert r.returncode == 2 and last.startswith("error: stopped: 3 non-finite steps") and "Traceback" not in r.stderr
    ckpt = torch.load(out2 / "checkpoint.pt", weights_only=True)
    tensors = [v for a in ckpt["adapters"].values() for v in a.values()]
    assert tensors and all(torch.isfinite(v).all() for v in tensors)
    for run in (out, out2):
        for d in adapters_of(run).values():
            assert all(torch.isfinite(v).all() for v in d.values())
