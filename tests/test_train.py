"""train_rid.py end to end, as a user runs it: subprocess runs on the tiny SD (and SDXL) folders of conftest.py with
weight-free rewards, checking the run folder's artifacts, stock-diffusers loading of every method's adapters, resume
after SIGKILL and after a stop at a task's last step, torchrun with two processes (training and the sharded
evaluation), the non-finite guard across a resume, the reward scales, fp16, and the experiment trackers."""
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, RUN, train

pytestmark = pytest.mark.slow  # every test here runs train_rid.py in a subprocess

# One adapters run serves two tests: no reward normalisation, and two steps made non-finite by the fault injection.
ADAPTERS_NAN = ("adapters", "--no_reward_norm")
NAN_STEPS = {"RID_FAULT_NAN_STEPS": "1,4"}
# The shared rid run uses the largest seed torch takes as a signed 64-bit integer; test_resume_after_sigkill resumes
# it twice (the flag walk's "large seed with resume", tests/test_flags.py).
METHOD_FLAGS = {"rid": ("--seed", str(2**63 - 1)), "l2": ("--l2_weight", "0.0001"),
                "soup": ("--soup_weight", "0.5"), "naive": (), "adapters": (), "joint": ()}


def adapters_of(run):
    return {d: load_file(os.path.join(run, "adapters", d, "pytorch_lora_weights.safetensors"))
            for d in sorted(os.listdir(os.path.join(run, "adapters")))}


def same_results(a, b):
    ra, rb = (json.load(open(os.path.join(run, "results.json"))) for run in (a, b))
    for key in ("matrix", "matrix_se", "structure", "gain", "forgetting", "average", "adapters", "adapter_weights"):
        assert ra[key] == rb[key], key
    x, y = adapters_of(a), adapters_of(b)
    assert x.keys() == y.keys()
    for d in x:
        for k in x[d]:
            assert torch.equal(x[d][k], y[d][k]), (d, k)


def test_run_folder_holds_results_adapters_and_pictures(trained):
    out, stdout = trained("rid", *METHOD_FLAGS["rid"])
    res = json.load(open(out / "results.json"))
    assert res["rewards"] == ["brightness", "saturation"] and res["method"] == "rid"
    assert np.array(res["matrix"]).shape == (3, 2)  # base, after task 1, after task 2
    assert len(res["forgetting"]) == len(res["average"]) == 2 and len(res["structure"]) == 3
    assert res["adapters"] == [[], ["adapters/task1_brightness"], ["adapters/task1_brightness", "adapters/task2_saturation"]]
    assert res["adapter_weights"] == [[], [1.0], [1.0, 1.0]]
    for f in ("results.md", "grid.png", "heatmap.png", "log.jsonl", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert "| base |" in stdout  # the table is printed at the end
    assert res["matrix"][1][0] > res["matrix"][0][0]  # the task's reward went up on its own task
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 6 and all(row["finite"] for row in log)
    # UNet calls per image and step: S + K recomputed + RID's K teacher forwards, and its student forwards at the
    # detached x_t of the K - 1 later window steps (each recomputed once in backward)
    assert res["train"]["unet_calls_per_image_step"] == {"forward": 4 + 2 + 2 + 1 * 2, "backward": 2 + 1}


def test_reward_scales_are_the_base_images_spread(trained, tiny_sd):
    """s_t = the standard deviation of reward t over the base model's evaluation images (the saved stage-0 PNGs
    give the same pixels); --no_reward_norm uses the rewards in their own units."""
    from rewards import load_reward
    out, _ = trained("rid", *METHOD_FLAGS["rid"])
    res = json.load(open(out / "results.json"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(out / "samples" / "stage0" / f"{k:03d}.png")))
                          .permute(2, 0, 1).float() / 255 for k in range(4)])
    for name, scale in zip(res["rewards"], res["train"]["reward_scales"]):
        spread = load_reward(name)(images, [""] * 4).std().item()
        assert scale == pytest.approx(spread, rel=1e-2) and scale != 1.0
    off, _ = trained(*ADAPTERS_NAN, env=NAN_STEPS)
    assert json.load(open(off / "results.json"))["train"]["reward_scales"] == [1.0, 1.0]


def test_toy_model_defaults(tmp_path):
    """A toy-world model picks the toy world's task sequence and CPU-sized defaults, recognised by its folder's
    toy.json, not its name: here a copy of the shipped model under another name, as toy.py --out DIR makes one."""
    import shutil
    from toy_world import TOY_REWARDS
    out, model = tmp_path / "toy", shutil.copytree(os.path.join(ROOT, "toy_model"), tmp_path / "my_toy")
    cmd = [sys.executable, os.path.join(ROOT, "train_rid.py"), "--model", str(model), "--out", str(out), "--iters", "1",
           "--eval_n", "8", "--ddim_steps", "6"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["rewards"] == TOY_REWARDS.split(",") and len(res["matrix"]) == 4
    assert (res["config"]["batch_size"], res["config"]["eval_batch_size"], res["config"]["method"]) == (8, 64, "rid")
    # the quick start's picture: naive trained with the same flags beside it, both grids in compare.png
    base = json.load(open(out / "baseline_naive" / "results.json"))
    assert base["method"] == "naive" and base["config"]["ddim_steps"] == 6 and base["config"]["baseline"] == "none"
    grid, naive_grid, both = (Image.open(p) for p in (out / "grid.png", out / "baseline_naive" / "grid.png", out / "compare.png"))
    assert both.width > grid.width + naive_grid.width and both.height > grid.height
    assert "compare.png: naive (left) and rid (right)" in r.stdout
    # held-out captions, so the caption checker measures structure; the base model follows them (chance: 1/192;
    # with these 6 DDIM steps the shipped model reads 0.5 of the 8)
    assert res["structure"][0]["caption"]["mean"] >= 0.375


@pytest.mark.parametrize("method", ["rid", "naive", "l2", "soup", "joint"])
def test_adapters_load_in_stock_pipeline_and_reproduce_evaluation(method, trained, tiny_sd):
    """The adapters of the last stage, loaded by diffusers' own load_lora_weights with the run's adapter weights,
    give the images train_rid evaluated (to 1 level of 255)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from eval import eval_set
    out, _ = trained(method, *METHOD_FLAGS[method])
    res = json.load(open(out / "results.json"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for k, folder in enumerate(res["adapters"][-1]):
        pipe.load_lora_weights(str(out / folder), adapter_name=f"a{k}")
        names.append(f"a{k}")
    pipe.set_adapters(names, adapter_weights=res["adapter_weights"][-1])
    prompts, seeds = eval_set(tiny_sd, 4, 0)
    last = out / "samples" / f"stage{len(res['adapters']) - 1}"
    for k, (prompt, seed) in enumerate(zip(prompts, seeds)):
        ref = np.asarray(pipe(prompt, num_inference_steps=4, guidance_scale=7.5,
                              generator=torch.Generator().manual_seed(seed)).images[0]).astype(int)
        ours = np.asarray(Image.open(last / f"{k:03d}.png")).astype(int)
        assert np.abs(ref - ours).max() <= 1
    base = np.asarray(Image.open(out / "samples" / "stage0" / "000.png")).astype(int)
    assert np.abs(base - np.asarray(Image.open(last / "000.png")).astype(int)).max() > 1
    if method == "soup":  # each adapter trained from the base alone, weighted 0.5 in the soup
        assert res["adapter_weights"] == [[], [0.5], [0.5, 0.5]]
    if method == "joint":  # one adapter on both rewards at once, T x iters steps, evaluated once
        assert res["adapters"] == [[], ["adapters/joint"]] and np.array(res["matrix"]).shape == (2, 2)
        assert len(open(out / "log.jsonl").readlines()) == 2 * 3 and res["train"]["seconds_total"][0] > 0
        assert res["gain"][1] == [None, None] and res["forgetting"] == [None]  # no single-task references here
        R, s = res["matrix"], res["train"]["reward_scales"]
        assert sum((R[1][j] - R[0][j]) / s[j] for j in range(2)) > 0  # what it trains on: the mean of r_j / s_j rose


def test_l2_pulls_the_adapter_towards_the_previous_model(trained):
    """A larger L2 weight leaves a smaller weight change (the penalty logged each step is that change)."""
    weak, _ = trained("l2", *METHOD_FLAGS["l2"])
    strong, _ = trained("l2", "--l2_weight", "300")
    norm = lambda run: sum((a[k] @ a[k.replace(".lora.up.", ".lora.down.")]).pow(2).sum().item()  # ||B A||^2
                           for a in adapters_of(run).values() for k in a if ".lora.up." in k)
    assert 0 < norm(strong) < 0.5 * norm(weak)
    log = [json.loads(line) for line in open(weak / "log.jsonl")]
    assert log[0]["loss_l2"] == 0 and log[1]["loss_l2"] > 0  # B = 0 at the first step: no change yet


@pytest.mark.parametrize("method", ["l2", "soup", "joint"])
def test_stop_at_the_last_step_of_a_task_then_resume_equals_uninterrupted(method, trained, tiny_sd, tmp_path):
    """SIGTERM during the last step of task 1 (joint: step 3 of its 6; the fault injection sends it through the real
    handler): the checkpoint is saved at that step, the resumed run finishes the task and ends with the uninterrupted
    run's results and adapters, bit for bit."""
    ref, _ = trained(method, *METHOD_FLAGS[method])
    out = tmp_path / "stopped"
    r = train(tiny_sd, out, *METHOD_FLAGS[method], method=method, env={"RID_FAULT_SIGNAL_STEP": "3"})
    assert r.returncode == 130 and "checkpoint saved at task 1, step 3" in r.stdout, r.stderr[-2000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["task"], ckpt["step"]) == (0, 3)
    r = train(tiny_sd, out, *METHOD_FLAGS[method], "--resume", method=method)
    assert r.returncode == 0, r.stderr[-2000:]
    same_results(ref, out)


def kill_twice_and_resume(model, out, flags):
    """Run train_rid.py, SIGKILL it at random moments inside training (twice), resume each time. -> the folder."""
    rng, log = random.Random(0), out / "log.jsonl"
    kills, started, rows = 0, time.time(), []
    proc = train(model, out, *flags, wait=False)
    while kills < 2:
        # Wait until this process trains (a log row written since it started), then kill it a random fraction of a
        # step later: inside the next step, or its checkpoint's write, on a host of any speed.
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            rows = open(log).read().split("\n")[:-1] if log.exists() else []  # whole rows only
            if len(rows) >= 1 + 2 * kills and log.stat().st_mtime > started:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 1) * json.loads(rows[-1])["seconds"] if rows else 0)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills, started = kills + 1, time.time()
        proc = train(model, out, *flags, "--resume", wait=False)
    assert proc.wait(timeout=300) == 0
    assert kills == 2, "the run finished before it could be killed twice"
    leftovers = [f for d in ("", "adapters", "samples") for f in os.listdir(out / d) if ".tmp" in f or ".old" in f]
    assert not leftovers  # what interrupted writes left behind is cleaned up on resume
    return out


def test_resume_after_sigkill_equals_uninterrupted_run(trained, tiny_sd, tmp_path):
    """Kill the run with SIGKILL at random moments (twice), resume each time: the final results and adapters equal
    the uninterrupted run's bit for bit (all randomness is a function of seed, task and step, and the checkpoint
    holds weights, EMA teacher and optimiser state)."""
    ref_out, _ = trained("rid", *METHOD_FLAGS["rid"])
    same_results(ref_out, kill_twice_and_resume(tiny_sd, tmp_path / "killed", METHOD_FLAGS["rid"]))


def flow_run(trained, model, family, *flags):
    """train_rid.py --method rid on a tiny flow-matching folder: results, adapters and pictures, with the teacher
    matched on the velocity (0 at each task's first step). -> (its folder, its results.json)"""
    ref, stdout = trained("rid", *flags, model=model)
    assert f"| {family}" in stdout
    res = json.load(open(ref / "results.json"))
    assert res["adapters"][-1] == ["adapters/task1_brightness", "adapters/task2_saturation"]
    assert all(np.isfinite(res["matrix"]).flatten()) and res["matrix"][1][0] > res["matrix"][0][0]
    for f in ("results.md", "grid.png", "heatmap.png", "samples/stage2/003.png"):
        assert (ref / f).is_file(), f
    log = [json.loads(line) for line in open(ref / "log.jsonl")]
    assert [row["loss_rid"] == 0 for row in log] == [True, False, False] * 2
    return ref, res


def test_sd3_run_writes_results_adapters_and_pictures_and_resumes_after_sigkill(trained, tiny_sd3, tmp_path):
    """train_rid.py --method rid on a tiny SD 3 folder (flow matching, T5): results, adapters and pictures, with the
    teacher matched on the velocity (0 at each task's first step); killed twice and resumed, it ends bit for bit where
    the uninterrupted run does."""
    ref, _ = flow_run(trained, tiny_sd3, "sd3")
    same_results(ref, kill_twice_and_resume(tiny_sd3, tmp_path / "killed", []))


def test_flux_run_writes_results_adapters_and_pictures_and_resumes_after_sigkill(trained, tiny_flux, tmp_path):
    """train_rid.py --method rid on a tiny FLUX.1-dev-like folder (guidance-distilled: one branch, the guidance scale
    an input): its family's defaults (28 Euler steps and guidance 3.5, FluxPipeline's; here 4 steps), results,
    adapters and pictures, the teacher matched on the velocity (0 at each task's first step); killed twice and
    resumed, it ends bit for bit where the uninterrupted run does."""
    ref, res = flow_run(trained, tiny_flux, "flux", *FLUX_32)
    assert res["config"]["guidance_scale"] == 3.5 and res["image_size"] == [32, 32]
    same_results(ref, kill_twice_and_resume(tiny_flux, tmp_path / "killed", list(FLUX_32)))


def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(tiny_sd, tmp_path):
    out = tmp_path / "ctrlc"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_rid.py"), "--model", tiny_sd, "--out", str(out),
                             *RUN, "--iters", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and open(out / "log.jsonl").read().count("\n") >= 2):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(proc.communicate()[1][-2000:])
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stdout and "Traceback" not in stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["task"] == 0 and ckpt["step"] >= 2


def test_ctrl_c_during_a_run_and_its_baseline_beside_it_leaves_both_resumable(tiny_sd, tmp_path):
    """--baseline naive trains beside the run in its own process (the toy quick start's layout). Ctrl-C to the run
    while both train: both save a checkpoint, the run exits 130 and says how to resume; --resume continues both to
    their results and compare.png. The baseline took the run's stage 0 (the same images) instead of evaluating it."""
    out = tmp_path / "pair"
    cmd = [sys.executable, os.path.join(ROOT, "train_rid.py"), "--model", tiny_sd, "--out", str(out), *RUN,
           "--iters", "25", "--grad_steps", "1", "--save_every", "100", "--baseline", "naive",  # K = 1: cheaper steps
           "--overwrite"]  # which the printed continue-command must leave out
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    for log in (out / "log.jsonl", out / "baseline_naive" / "log.jsonl"):
        while not (log.exists() and open(log).read().count("\n") >= 2):
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()  # a stopped process too: communicate() would wait for it forever
                pytest.fail(proc.communicate()[1][-2000:])
            time.sleep(0.05)
        if log.parent == out:  # the run holds still (as on Ctrl-Z) until its baseline, which starts later, trains too:
            proc.send_signal(signal.SIGSTOP)  # on a fast host the run could otherwise finish first
    proc.send_signal(signal.SIGINT)  # pending while stopped, heard on SIGCONT
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in stdout and "Traceback" not in stderr, stderr[-2000:]
    for run in (out, out / "baseline_naive"):
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        assert (ckpt["task"], ckpt["step"]) >= (0, 2) and not (run / "results.json").exists()
    again = shlex.split(stdout.split("Continue with:\n")[1].splitlines()[0])  # run as printed
    assert again[0] == sys.executable and "--overwrite" not in again and again[-1] == "--resume"
    r = subprocess.run(again, capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "compare.png").is_file() and (out / "baseline_naive" / "results.json").is_file()
    assert "baseline: naive with the same settings" in r.stdout and r.stdout.count("| base |") == 2
    for k in range(4):  # the baseline's stage 0 is the run's own, image for image
        a, b = (np.asarray(Image.open(run / "samples" / "stage0" / f"{k:03d}.png")) for run in (out, out / "baseline_naive"))
        assert np.array_equal(a, b)
    assert json.load(open(out / "baseline_naive" / "results.json"))["train"]["evaluation_seconds"][0] == 0.0


def test_nonfinite_steps_are_skipped_counted_and_the_count_survives_a_resume(trained, tiny_sd, tmp_path):
    out, _ = trained(*ADAPTERS_NAN, env=NAN_STEPS)
    res = json.load(open(out / "results.json"))
    assert res["train"]["skipped_steps"] == [1, 1]  # global step 1 is in task 1, step 4 in task 2
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["finite"] for row in log] == [False, True, True, False, True, True]
    # Two non-finite steps, a stop, a resume, three more (across the task boundary): the run in a row reaches 5
    # (train_rid.MAX_NONFINITE), so it stops with one clear line.
    out2 = tmp_path / "nan_stop"
    nan = {"RID_FAULT_NAN_STEPS": "1,2,3,4,5"}
    r = train(tiny_sd, out2, method="adapters", env={**nan, "RID_FAULT_SIGNAL_STEP": "2"})
    assert r.returncode == 130 and torch.load(out2 / "checkpoint.pt", weights_only=True)["nonfinite_run"] == 2
    r = train(tiny_sd, out2, "--resume", method="adapters", env=nan)
    last = r.stderr.strip().splitlines()[-1]  # (the progress bars above it also go to stderr)
    assert r.returncode == 2 and last.startswith("error: stopped: 5 non-finite steps in a row (task 2, step 2)")
    assert "Traceback" not in r.stderr
    ckpt = torch.load(out2 / "checkpoint.pt", weights_only=True)
    tensors = [v for a in ckpt["adapters"].values() for v in a.values()]
    assert tensors and all(torch.isfinite(v).all() for v in tensors)


def test_fp16_trains_with_a_loss_scaler(tiny_sd, tmp_path):
    """--dtype float16 (GPUs without bf16): frozen networks in fp16, LoRA weights in fp32, the loss scaled so the
    small gradients survive the fp16 backward; the reward goes up and nothing is skipped."""
    out = tmp_path / "fp16"
    # --no_reward_norm: the random tiny model's brightness hardly varies (s_t = 0.002), which would make the loss
    # 500 times a real model's and start the scaler far too high
    r = train(tiny_sd, out, "--dtype", "float16", "--rewards", "brightness", "--iters", "4", "--lr", "0.05",
              "--no_reward_norm", method="adapters")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "with a loss scaler" in r.stdout
    res = json.load(open(out / "results.json"))
    assert res["train"]["skipped_steps"] == [0] and res["matrix"][1][0] > res["matrix"][0][0]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for a in adapters_of(out).values() for v in a.values())


def stock_pipeline(family, folder):
    """diffusers' own pipeline of the family, with DDIM for the UNet families (as rid samples them)."""
    import diffusers
    cls = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
           "flux": "FluxPipeline"}
    pipe = getattr(diffusers, cls[family]).from_pretrained(folder)
    if family in ("sd", "sdxl"):
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FLUX_32 = ("--height", "32", "--width", "32")  # the tiny FLUX layout's size (FluxPipeline's default: 128 latent px)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_an_adapter_reloads_whole_and_gives_the_images_the_run_evaluated(family, trained, tiny_sd, tiny_sdxl,
                                                                          tiny_sd3, tiny_flux, tmp_path):
    """The adapter that task 1 of a train_rid.py run saved, against the images the run's model in memory made of
    its evaluation set after that task (samples/stage1.pt): loaded by a stock diffusers pipeline, every tensor of the
    file becomes a weight of the denoiser and the pipeline gives those images to 1/255; sampled through
    `sample.py --lora`, the first image again. The family comes from model_index.json."""
    from conftest import assert_loaded_whole
    from eval import eval_set
    folder = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}[family]
    size = FLUX_32 if family == "flux" else ()
    out, stdout = trained("rid", *METHOD_FLAGS["rid"]) if family == "sd" else trained("rid", *size, model=folder)
    assert f"| {family}" in stdout
    res = json.load(open(out / "results.json"))
    config, adapter = res["config"], str(out / res["adapters"][1][0])
    memory = torch.load(out / "samples" / "stage1.pt", weights_only=True).permute(0, 2, 3, 1).numpy().astype(int)
    base = torch.load(out / "samples" / "stage0.pt", weights_only=True).permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(memory - base).max() > 20, "task 1 must visibly change the images for the comparison to mean anything"
    pipe = stock_pipeline(family, folder)
    pipe.load_lora_weights(adapter, adapter_name="task1")
    assert_loaded_whole(adapter, pipe.unet if family in ("sd", "sdxl") else pipe.transformer, "task1")
    prompts, seeds = eval_set(folder, config["eval_n"])
    h, w = res["image_size"]
    stock = np.stack([np.asarray(pipe(p, height=h, width=w, num_inference_steps=config["ddim_steps"],
                                      guidance_scale=config["guidance_scale"],
                                      generator=torch.Generator().manual_seed(s)).images[0]) for p, s in zip(prompts, seeds)])
    assert np.abs(stock.astype(int) - memory).max() <= 1
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model", folder, "--prompt", prompts[0],
                        "--seed", str(seeds[0]), "--ddim_steps", str(config["ddim_steps"]), "--guidance_scale",
                        str(config["guidance_scale"]), "--lora", adapter, *size, "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.abs(np.asarray(Image.open(tmp_path / "cli" / "000.png")).astype(int) - memory[0]).max() <= 1


def test_tensorboard_log_holds_the_scalars_and_the_grid(tiny_sd, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    r = train(tiny_sd, out, "--log", "tensorboard", "--iters", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"train/reward", "train/loss_reward", "train/loss_rid", "train/grad_norm", "train/seconds"} <= set(tags["scalars"])
    assert {"eval/after_task2/saturation", "eval/forgetting", "eval/average_gain", "eval/ssim"} <= set(tags["scalars"])
    rewards = [e.value for e in events.Scalars("train/reward")]
    log = [json.loads(line)["reward"] for line in open(out / "log.jsonl")]
    assert rewards == pytest.approx(log)  # the same numbers as log.jsonl
    assert [e.step for e in events.Images("eval/grid")] == [2, 4]  # one grid per task, at its last step


def test_wandb_offline_writes_a_run_folder(tiny_sd, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "wb"
    r = train(tiny_sd, out, "--log", "wandb", "--iters", "1", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(out / "wandb" / runs[0]))


def test_a_missing_tracker_package_is_one_line(tiny_sd, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "tensorboard.py").write_text("raise ImportError('hidden for the test')\n")
    r = train(tiny_sd, tmp_path / "x", "--log", "tensorboard", env={"PYTHONPATH": str(hide)})
    assert r.returncode == 2 and "pip install tensorboard" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_the_printed_continue_command_works_after_overwrite(trained, tiny_sd, tmp_path):
    """A run started with --overwrite and stopped (SIGTERM at step 2) prints the command that continues it: this
    interpreter, the same flags with --resume and without --overwrite, quoted for a shell. Run as printed, it ends
    where the uninterrupted run does."""
    import shlex
    ref, _ = trained("rid", *METHOD_FLAGS["rid"])
    out = tmp_path / "with space"
    (out).mkdir()
    (out / "earlier.txt").write_text("an earlier run's file, which --overwrite deletes")
    r = train(tiny_sd, out, *METHOD_FLAGS["rid"], "--overwrite", env={"RID_FAULT_SIGNAL_STEP": "2"})
    assert r.returncode == 130, r.stderr[-2000:]
    line = r.stdout.split("Continue with:\n")[1].splitlines()[0].strip()
    argv = shlex.split(line)
    assert argv[0] == sys.executable and "--overwrite" not in argv and argv[-1] == "--resume"
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    same_results(ref, out)


def test_a_kill_between_checkpoints_logs_each_step_once(trained, tiny_sd, tmp_path):
    """Checkpoints only after each task (--save_every 100); SIGKILL at the start of global step 5 (task 2, step 2),
    after step 4 was logged; --resume continues from task 2, step 0: log.jsonl holds each of the 6 steps once, with
    the uninterrupted run's figures, and TensorBoard shows each step once (whatever of step 4 the killed process had
    flushed is purged, and the resumed run logs it again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    flags = [*METHOD_FLAGS["rid"], "--save_every", "100", "--log", "tensorboard"]  # neither changes a result
    ref, out = trained("rid", *METHOD_FLAGS["rid"])[0], tmp_path / "killed"
    r = train(tiny_sd, out, *flags, env={"RID_FAULT_SIGNAL_STEP": "5", "RID_FAULT_SIGNAL": "KILL"})
    assert r.returncode == -signal.SIGKILL and len(open(out / "log.jsonl").readlines()) == 4
    r = train(tiny_sd, out, *flags, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [[json.loads(line) for line in open(run / "log.jsonl")] for run in (ref, out)]
    assert [(x["task"], x["step"]) for x in rows[1]] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    for x, y in zip(*rows):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/reward")] == [1, 2, 3, 4, 5, 6]


def test_a_kill_while_the_report_is_written_leaves_a_run_that_resume_finishes(trained, tiny_sd, tmp_path):
    """results.json, the marker of a finished run, is written after the tables and pictures: a kill in between leaves
    a run without it, which --resume completes (here: a finished run with its last three files gone, as such a kill
    leaves it). The report alone is redone: the same results."""
    import shutil
    ref, _ = trained("naive")
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    for name in ("results.json", "heatmap.png", "grid.png"):
        os.remove(out / name)
    r = train(tiny_sd, out, "--resume", method="naive")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout and (out / "grid.png").is_file() and (out / "heatmap.png").is_file()
    same_results(ref, out)
