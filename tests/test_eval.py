"""eval.py: the RIL metrics against a hand-computed example and their edge cases, SSIM against a loop-by-loop
reference, paired determinism of evaluate on the tiny SD folder, the report files, and the CLI end to end."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import toy_world
from common import UserError
from conftest import ROOT
from eval import eval_set, evaluate, ril_metrics, ssim, write_report
from rewards import load_reward

# -----------------------------------------------------------------------------
# ril_metrics


def test_ril_metrics_hand_computed():
    # R (rows: base, after task 1, 2, 3; columns: rewards of tasks 1, 2, 3) and the gains by hand:
    #   own gains (normalisers): task 1: 2.0 - 1.0 = 1.0, task 2: 14 - 10 = 4, task 3: 0.8 - 0.0 = 0.8
    #   g row 1: [1, (9-10)/4 = -0.25, 0.5/0.8 = 0.625]
    #   g row 2: [1.2, 1, 0.25]            (task 2 raised reward 1 further: 2.2 - 1.0 = 1.2)
    #   g row 3: [0.25, 0.5, 1]
    # F_1 = None (nothing to forget)
    # F_2 = g[1][1] - g[2][1] = 1 - 1.2 = -0.2                      (negative: backward transfer)
    # F_3 = mean( max(g[1][1], g[2][1]) - g[3][1], g[2][2] - g[3][2] ) = mean(1.2 - 0.25, 1 - 0.5) = 0.725
    #       (1-based tasks; a version that compared with the diagonal only would give mean(0.75, 0.5) = 0.625)
    # A_1 = 1, A_2 = (1.2 + 1) / 2 = 1.1, A_3 = (0.25 + 0.5 + 1) / 3 = 0.58333...
    R = [[1.0, 10.0, 0.0],
         [2.0, 9.0, 0.5],
         [2.2, 14.0, 0.2],
         [1.25, 12.0, 0.8]]
    m = ril_metrics(R)
    expected = [[0, 0, 0], [1, -0.25, 0.625], [1.2, 1, 0.25], [0.25, 0.5, 1]]
    for row, want in zip(m["gain"], expected):
        assert row == pytest.approx(want, abs=1e-12)
    assert m["forgetting"][0] is None
    assert m["forgetting"][1:] == pytest.approx([-0.2, 0.725], abs=1e-12)
    assert m["average"] == pytest.approx([1.0, 1.1, 1.75 / 3], abs=1e-12)
    assert m["warnings"] == []


def test_ril_metrics_one_task():
    m = ril_metrics([[0.2], [0.5]])
    assert m["gain"] == [[0.0], [pytest.approx(1.0)]]
    assert m["forgetting"] == [None] and m["average"] == [pytest.approx(1.0)] and m["warnings"] == []
    json.dumps(m, allow_nan=False)  # strict JSON: no NaN anywhere


def test_ril_metrics_reward_without_gain():
    # Task 2 did not move its own reward at all: (R[2][1] - R[0][1]) = 0, the normaliser of column 2.
    R = [[1.0, 5.0], [2.0, 5.5], [1.5, 5.0]]
    m = ril_metrics(R)
    assert [row[1] for row in m["gain"]] == [None, None, None]  # undefined, not inf or NaN
    assert [row[0] for row in m["gain"]] == pytest.approx([0.0, 1.0, 0.5])
    # Column 2 is left out of the means: F_2 = 1 - 0.5 over task 1 only, A_2 = g[2][1] = 0.5 alone.
    assert m["forgetting"] == [None, pytest.approx(0.5)]
    assert m["average"] == [pytest.approx(1.0), pytest.approx(0.5)]
    assert len(m["warnings"]) == 1 and "task 2" in m["warnings"][0]
    json.dumps(m, allow_nan=False)
    # Only the excluded task: no defined entry left, so the means are None, not a ZeroDivisionError.
    m = ril_metrics([[3.0], [3.0]])
    assert m["gain"] == [[None], [None]] and m["average"] == [None] and len(m["warnings"]) == 1
    # A gain of 1e-9 on a reward of scale 20 counts as none; 1e-3 does not.
    assert ril_metrics([[20.0], [20.0 + 1e-9]])["gain"][1] == [None]
    assert ril_metrics([[20.0], [20.001]])["gain"][1] == [pytest.approx(1.0)]


def test_ril_metrics_negative_gain():
    # Task 1 lowered its own reward (0.8 -> 0.6): normalised by -0.2, so the diagonal is still 1 and a return
    # to the base value is 0. After task 2 reward 1 is at 0.7: half the loss is kept, g = 0.5, F_2 = 0.5.
    R = [[0.8, 0.1], [0.6, 0.1], [0.7, 0.4]]
    m = ril_metrics(R)
    assert [row[0] for row in m["gain"]] == pytest.approx([0.0, 1.0, 0.5])
    assert m["forgetting"] == [None, pytest.approx(0.5)] and m["average"] == [pytest.approx(1.0), pytest.approx(0.75)]
    assert len(m["warnings"]) == 1 and "lowered" in m["warnings"][0]

# -----------------------------------------------------------------------------
# SSIM


def reference_ssim(x, y, win=11, sigma=1.5):
    """Straight from Wang et al. 2004, one window position at a time, in numpy: (C, H, W) pair -> float."""
    ax = np.arange(win) - (win - 1) / 2
    w = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma ** 2))
    w /= w.sum()
    C1, C2, vals = 0.0001, 0.0009, []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - win + 1):
            for j in range(x.shape[2] - win + 1):
                a, b = x[c, i:i + win, j:j + win], y[c, i:i + win, j:j + win]
                mu_a, mu_b = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
                cov = (w * (a - mu_a) * (b - mu_b)).sum()
                vals.append((2 * mu_a * mu_b + C1) * (2 * cov + C2) / ((mu_a ** 2 + mu_b ** 2 + C1) * (va + vb + C2)))
    return float(np.mean(vals))


def test_ssim_against_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 15, 14, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 15, 14, generator=g)).clamp(0, 1)
    y[1] = torch.rand(3, 15, 14, generator=g)  # an unrelated image: SSIM near 0
    ours = ssim(x, y)
    ref = [reference_ssim(x[k].double().numpy(), y[k].double().numpy()) for k in range(2)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-5)
    assert ref[0] > 0.3 and abs(ref[1]) < 0.2  # the pair is in a range where a wrong formula would show
    assert ssim(x, x).tolist() == [1.0, 1.0]
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert ssim(flat, flat).item() == 1.0  # no cancellation trouble on a flat image
    noisy = [ssim(x, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert noisy[0] > noisy[1] > noisy[2]

# -----------------------------------------------------------------------------
# evaluate on the tiny SD folder


def test_eval_set_is_fixed():
    prompts, seeds = eval_set("some/model", 40, seed=1)
    assert len(prompts) == len(seeds) == len(set(seeds)) == 40 and prompts[32] == prompts[0]
    assert eval_set("some/model", 40, seed=1) == (prompts, seeds)
    assert set(eval_set("some/model", 4, seed=2)[1]).isdisjoint(seeds)


def test_evaluate_is_paired_and_deterministic(tiny_sd):
    pipe = sample.load_pipeline(tiny_sd)
    rewards = {"brightness": load_reward("brightness"), "saturation": load_reward("saturation")}
    prompts, seeds = eval_set(tiny_sd, 5, seed=3)
    kw = dict(ddim_steps=4, progress=False)
    a = evaluate(pipe, rewards, prompts, seeds, batch_size=4, **kw)
    b = evaluate(pipe, rewards, prompts, seeds, batch_size=1, base_images=a["images"], **kw)
    assert a["images"].shape == (5, 3, 32, 32) and a["images"].std() > 0.05
    # Per-image seeds: batching does not change any image beyond float rounding (CPU kernels sum in a
    # batch-size-dependent order); a shared generator would give entirely different images here.
    torch.testing.assert_close(a["images"], b["images"], atol=1e-5, rtol=0)
    for name in rewards:
        assert a["rewards"][name] == pytest.approx(b["rewards"][name], abs=1e-6)
    again = evaluate(pipe, rewards, prompts, seeds, batch_size=4, **kw)
    assert torch.equal(again["images"], a["images"]) and again["rewards"] == a["rewards"]  # same call: bit-identical
    assert b["structure"]["ssim"]["mean"] == pytest.approx(1.0, abs=1e-6)
    r = a["rewards"]["brightness"]
    scores = rewards["brightness"](a["images"], prompts).double()
    assert r["mean"] == pytest.approx(scores.mean().item())
    assert r["se"] == pytest.approx(scores.std().item() / math.sqrt(5))  # sample std (N - 1) / sqrt(N)
    # image k depends only on (prompt k, seed k): a subset reproduces its images exactly
    c = evaluate(pipe, rewards, prompts[2:4], seeds[2:4], batch_size=2, **kw)
    torch.testing.assert_close(c["images"], a["images"][2:4], atol=1e-5, rtol=0)


def test_evaluate_clip_drift(tiny_sd):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16)).eval()
    pipe = sample.load_pipeline(tiny_sd)
    prompts, seeds = eval_set(tiny_sd, 3)
    base = evaluate(pipe, {}, prompts, seeds, ddim_steps=3, progress=False)["images"]
    same = evaluate(pipe, {}, prompts, seeds, ddim_steps=3, base_images=base, clip_model=clip, progress=False)
    assert same["structure"]["clip"]["mean"] == pytest.approx(1.0, abs=1e-5)
    other = evaluate(pipe, {}, prompts, seeds, ddim_steps=3, base_images=base.flip(0), clip_model=clip, progress=False)
    assert other["structure"]["clip"]["mean"] < 0.999 and other["structure"]["ssim"]["mean"] < 0.99

def test_caption_structure_on_a_hand_made_stage():
    """Six images whose verdicts are known by construction: four drawn for their captions, one flat (no shape, no
    shape colour, right background), one drawn for another caption with the same background (wrong colour and
    shape). Caption match = 4/6, shape 4/6, colour 4/6, background 6/6; SSIM to itself 1."""
    from eval import structure_of
    captions = ["a red circle on a blue background", "a green square on a black background",
                "a yellow triangle on a magenta background", "a white circle on a red background",
                "a cyan square on a green background", "a blue triangle on a yellow background"]
    images = toy_world.render(captions, seed=3)
    images[4] = images[4, :, :1, :1].expand(3, 32, 32)  # flat: the background colour everywhere
    images[5] = toy_world.render(["a red square on a yellow background"], seed=4)[0]
    s = structure_of(images, captions, base_images=images, toy=True)
    assert s["caption"]["mean"] == pytest.approx(4 / 6) and s["caption"]["background"] == 1.0
    assert s["caption"]["shape"] == pytest.approx(4 / 6) and s["caption"]["colour"] == pytest.approx(4 / 6)
    assert s["ssim"]["mean"] == pytest.approx(1.0)
    assert "caption" not in structure_of(images, captions) and "ssim" not in structure_of(images, captions)


# -----------------------------------------------------------------------------
# write_report


def fake_results(T=2):
    R = [[0.5, 0.2], [0.7, 0.1], [0.6, 0.4]][:T + 1]
    return {"model": "tiny", "method": "rid", "rewards": ["brightness", "saturation"][:T], "config": {"seed": 0},
            "matrix": [row[:T] for row in R], "matrix_se": [[0.01] * T for _ in range(T + 1)],
            "structure": [{}] + [{"ssim": {"mean": 0.9, "se": 0.01}}] * T,
            "adapters": [[]] + [[f"adapters/task{k + 1}"] for k in range(T)], "train": {"seconds": 1.0}}


def test_write_report(tmp_path):
    results = fake_results()
    stage_images = [torch.rand(10, 3, 32, 32) for _ in range(3)]
    table = write_report(str(tmp_path), results, stage_images)
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "heatmap.png", "results.json", "results.md"]  # no temp files
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["matrix"] == results["matrix"] and saved["config"] == {"seed": 0}
    assert saved["gain"][2] == pytest.approx([0.5, 1.0]) and saved["average"] == pytest.approx([1.0, 0.75])
    assert saved["forgetting"] == [None, pytest.approx(0.5)]
    assert (tmp_path / "results.md").read_text() == table and table.count("\n| ") == 3  # header + 3 stages
    assert "0.7 ± 0.01" in table and "0.9 ± 0.01" in table
    grid = Image.open(tmp_path / "grid.png")
    # 3 stages x 8 columns (of 10 images) of 32 px images upscaled x3 to 96 px, 2 px padding, 130 px labels
    assert grid.size == (130 + 8 * 98 + 2, 3 * 98 + 2)
    # column 5 of row 2 shows stage 2's image 5, upscaled by nearest
    cell = np.asarray(grid)[2 + 2 * 98:2 + 2 * 98 + 96, 130 + 2 + 5 * 98:130 + 2 + 5 * 98 + 96]
    want = (stage_images[2][5].permute(1, 2, 0) * 255).round().numpy().repeat(3, 0).repeat(3, 1)
    assert np.abs(cell.astype(float) - want).max() <= 1
    assert Image.open(tmp_path / "heatmap.png").size[1] > 3 * 40
    # one task: no forgetting to report, still every file
    write_report(str(tmp_path / "one"), fake_results(T=1), stage_images[:2])
    assert json.loads((tmp_path / "one" / "results.json").read_text())["forgetting"] == [None]

def test_ril_metrics_negative_reference_gain_is_null():
    # a reward that fell when trained alone: dividing by its reference gain would turn losses into gains
    R = [[1.0, 5.0], [2.0, 4.9], [1.5, 4.8]]
    m = ril_metrics(R, scale=[1.0, -0.1])
    assert [row[1] for row in m["gain"]] == [None, None, None] and m["gain"][2][0] == pytest.approx(0.5)
    assert m["forgetting"][1] == pytest.approx(0.5) and m["average"][1] == pytest.approx(0.5)
    assert "not learnable" in m["warnings"][0]
    assert ril_metrics(R)["gain"][2][1] == pytest.approx(1.0)  # paper-style: its own fall, the whole loss kept


def test_ril_metrics_joint():
    # --method joint: base and one model trained on every task at once; gains only against given normalisers
    R = [[1.0, 10.0, 0.0], [1.5, 12.0, 0.2]]
    m = ril_metrics(R)
    assert m["gain"] == [[None] * 3] * 2 and m["forgetting"] == [None] and m["average"] == [None]
    assert "single-task" in m["warnings"][0]
    m = ril_metrics(R, scale=[1.0, 4.0, 0.4])
    assert m["gain"][1] == pytest.approx([0.5, 0.5, 0.5]) and m["gain"][0] == [0, 0, 0]
    assert m["forgetting"] == [None] and m["average"] == [pytest.approx(0.5)]
    m = ril_metrics(R, scale=[1.0, 0.0, 0.4])  # a reward that did not move when trained alone: its column is null
    assert m["gain"][1] == [pytest.approx(0.5), None, pytest.approx(0.5)] and m["average"] == [pytest.approx(0.5)]
    assert m["warnings"] and json.dumps(m, allow_nan=False)


def test_hacking_gap_by_hand_and_the_picture(tmp_path):
    """A learned toy reward beside its ground truth: images 0 and 1 turn into flat backgrounds (truth 0) while their
    toypref score rises; image 4's score rises with its truth unchanged. The gap is the score's gain less beta times
    the truth's, over the score's base spread, beta fitted on the base images, all by hand here; hacking.png shows
    images 0 and 1, the larger rise first."""
    prompts = eval_set("toy", 6)[0]
    base = toy_world.render(prompts, seed=5, min_half=9, max_half=11, follow=0.0)  # large shapes, whatever the size
    final = base.clone()
    final[:2] = base[:2, :, :1, :1]  # each image's background colour (the corner pixel) everywhere
    # an honest score on the base images, its truth plus a little noise: beta > 0, whatever the captions draw
    r0 = 0.5 * toy_world.preference_truth(base) + torch.tensor([0.02, -0.01, 0.0, 0.01, -0.02, 0.01])
    r1 = r0 + torch.tensor([0.4, 0.5, -0.1, 0.0, 0.1, 0.0])
    results = {**fake_results(), "config": {"model": "toy"}, "rewards": ["toypref", "brightness"],
               "matrix": [[r0.mean().item(), 0.5], [r0.mean().item(), 0.6], [r1.mean().item(), 0.7]]}
    scores = [{"toypref": r0}, {"toypref": r0}, {"toypref": r1}]
    table = write_report(str(tmp_path), results, [base, base, final], scores)
    g0, g1 = toy_world.preference_truth(base).double(), toy_world.preference_truth(final).double()
    assert g1[2:].tolist() == g0[2:].tolist() and all(g1[:2] == 0) and all(g0[:2] > 0.5)
    r0d, r1d = r0.double(), r1.double()
    beta = sum((r0d - r0d.mean()) * (g0 - g0.mean())) / sum((g0 - g0.mean()) ** 2)  # the regression slope, by hand
    want = ((r1d.mean() - r0d.mean() - beta * (g1.mean() - g0.mean())) / r0d.std()).item()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["hacking_gap"]["toypref"] == [0.0, 0.0, pytest.approx(want, rel=1e-5)] and want > 1
    assert saved["hacking_gap_se"]["toypref"][2] > 0 and saved["hacking_note"] == {"toypref": None}
    assert saved["hacked_images"] == {"toypref": 2}
    assert saved["truth"][2]["toypref"]["mean"] == pytest.approx(g1.mean().item(), rel=1e-6)
    assert "toypref truth" in table and "toypref hacking gap" in table
    picture = Image.open(tmp_path / "hacking.png")
    assert picture.size == (70 + 2 * 98 + 2, 2 * 98 + 2 + 44)  # 2 columns of base over final, labels below
    top_left = np.asarray(picture)[2:98, 72:168]  # image 1 (rise 0.5) first, its base image above
    assert np.abs(top_left.astype(float) - (base[1].permute(1, 2, 0) * 255).numpy().repeat(3, 0).repeat(3, 1)).max() <= 1

def test_the_hacking_gap_of_an_honest_noisy_proxy_is_zero_within_its_error():
    """An honest but noisy proxy, r = 2 g + noise (correlation with its truth about 0.76), on 400 paired images whose
    truth rises by 0.3, drawn 40 times: the gaps average 0 within three standard errors of their mean, their spread is
    the standard error they report (to 30%), and at least 85% lie within two of it (95% expected). The measure it
    replaced, the score's gain minus the truth's, each in its own base spread, reads (rho - 1) times the truth's gain:
    clearly negative, every time."""
    from eval import hacking_gap
    gaps, ses, old = [], [], []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        g0 = torch.rand(400, generator=g)
        r0 = 2 * g0 + 0.5 * torch.randn(400, generator=g)
        gi = g0 + 0.3
        ri = 2 * gi + 0.5 * torch.randn(400, generator=g)
        gap, se, why = hacking_gap(r0, ri, g0, gi)
        assert why is None
        gaps.append(gap)
        ses.append(se)
        old.append(((ri.mean() - r0.mean()) / r0.std() - (gi.mean() - g0.mean()) / g0.std()).item())
    gaps, ses = torch.tensor(gaps), torch.tensor(ses)
    assert gaps.mean().abs() < 3 * ses.mean() / 40 ** 0.5
    assert 0.7 < gaps.std() / ses.mean() < 1.3
    assert ((gaps.abs() < 2 * ses).float().mean() >= 0.85) and max(old) < -0.1


def test_the_hacking_gap_of_a_score_that_rises_while_its_truth_falls_is_clearly_above_zero():
    from eval import hacking_gap
    g = torch.Generator().manual_seed(1)
    g0 = torch.rand(200, generator=g)
    r0 = 2 * g0 + 0.5 * torch.randn(200, generator=g)
    gap, se, why = hacking_gap(r0, r0 + 0.6, g0, g0 - 0.1)  # the score up by 0.6, its truth down by 0.1
    assert why is None and gap > 10 * se and gap == pytest.approx((0.6 + 0.1 * 2) / r0.double().std().item(), rel=0.1)


def test_the_hacking_gap_is_null_with_its_reason_where_the_truth_barely_varies_at_the_base():
    """A truth that is 1 on 63 of 64 base images (a model that draws nearly every caption right): one image cannot
    fit beta."""
    from eval import hacking_gap
    g0 = torch.ones(64)
    g0[7] = 2 / 3
    r0 = torch.linspace(0.2, 0.3, 64)
    assert hacking_gap(r0, r0 + 0.1, g0, g0) == (None, None, "its truth varies on 1 of 64 base images, too few to "
                                                              "fit beta")

# -----------------------------------------------------------------------------
# The CLI on a run folder built here the way train_rid.py builds it


def run_eval_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


SEED = 0  # seeds the adapters: their own gains (-0.03, +0.02) are far above float noise


@pytest.fixture(scope="module")
def fake_run(tiny_sd, tmp_path_factory):
    """A finished 2-task 'adapters' run: two LoRA adapters with random non-zero B, results from evaluate."""
    run = str(tmp_path_factory.mktemp("run"))
    config = {"model": tiny_sd, "eval_n": 5, "eval_batch_size": 2, "ddim_steps": 4,
              "guidance_scale": 7.5, "eta": 0.0, "device": "cpu", "dtype": "float32", "reward_path": []}
    names = ["brightness", "saturation"]
    pipe = sample.load_pipeline(tiny_sd)
    rewards = {n: load_reward(n) for n in names}
    prompts, seeds = eval_set(tiny_sd, config["eval_n"])
    kw = dict(ddim_steps=4, batch_size=2, progress=False)
    stages = [evaluate(pipe, rewards, prompts, seeds, **kw)]
    adapters = [[]]
    for k, name in enumerate(names):
        torch.manual_seed(SEED + k)  # A's init and B below: the same run in every process, whatever ran before
        sample.add_lora(pipe.denoiser, f"task{k + 1}", rank=4, alpha=8.0)
        with torch.no_grad():
            for key, p in sample.lora_params(pipe.denoiser, f"task{k + 1}").items():
                if "lora_B" in key:  # B = 0 at init would leave the model unchanged
                    p.normal_(0, 0.3)
        sample.save_lora(pipe, f"task{k + 1}", os.path.join(run, "adapters", f"task{k + 1}_{name}"))
        adapters.append(adapters[-1] + [f"adapters/task{k + 1}_{name}"])
        sample.set_adapters(pipe.denoiser, [f"task{j + 1}" for j in range(k + 1)])
        stages.append(evaluate(pipe, rewards, prompts, seeds, base_images=stages[0]["images"], **kw))
    assert not torch.allclose(stages[2]["images"], stages[0]["images"], atol=0.05), "adapters must change images"
    results = {"model": tiny_sd, "method": "adapters", "rewards": names, "config": config,
               "matrix": [[s["rewards"][n]["mean"] for n in names] for s in stages],
               "matrix_se": [[s["rewards"][n]["se"] for n in names] for s in stages],
               "structure": [s["structure"] for s in stages], "adapters": adapters,
               "adapter_weights": [[1.0] * len(a) for a in adapters], "train": {}}
    write_report(run, results, [s["images"] for s in stages])
    return run


@pytest.mark.slow
def test_cli_recomputes_a_run(fake_run):
    before = open(os.path.join(fake_run, "results.json"), "rb").read()
    r = run_eval_cli("--run", fake_run)
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(fake_run, "results.json"), "rb").read() == before  # the training record is untouched
    old = json.loads(before)
    new = json.loads(open(os.path.join(fake_run, "eval", "results.json")).read())
    assert np.abs(np.array(new["matrix"]) - np.array(old["matrix"])).max() < 1e-5
    assert new["structure"][2]["ssim"]["mean"] == pytest.approx(old["structure"][2]["ssim"]["mean"], abs=1e-5)
    assert old["structure"][2]["ssim"]["mean"] < 0.99  # the adapters did change the images
    assert new["gain"] == [pytest.approx(row, abs=1e-3) for row in old["gain"]]
    files = sorted(os.listdir(os.path.join(fake_run, "eval")))
    assert files == ["grid.png", "heatmap.png", "results.json", "results.md"]
    assert "| 2: saturation |" in r.stdout and "largest absolute difference" in r.stdout


@pytest.mark.parametrize("case", ["no_run", "no_results", "not_results", "missing_adapter", "out_is_run",
                                  "damaged_results", "damaged_adapter"])
def test_cli_bad_input_is_one_line(case, fake_run, tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    args = {"no_run": ["--run", str(tmp_path / "nope")], "no_results": ["--run", str(tmp_path)],
            "not_results": ["--run", run], "missing_adapter": ["--run", run], "damaged_results": ["--run", run],
            "damaged_adapter": ["--run", run, "--out", str(tmp_path / "eval")],
            "out_is_run": ["--run", fake_run, "--out", fake_run]}[case]
    if case in ("not_results", "missing_adapter"):  # a copy of the run without its adapters, or a foreign json
        os.makedirs(run)
        results = json.load(open(os.path.join(fake_run, "results.json")))
        with open(os.path.join(run, "results.json"), "w") as f:
            json.dump(results if case == "missing_adapter" else {"matrix": []}, f)
    if case in ("damaged_results", "damaged_adapter"):  # a copy with a truncated results.json or adapter file
        import shutil
        shutil.copytree(fake_run, run)
        name = "results.json" if case == "damaged_results" else "adapters/task2_saturation/" + sample.LORA_WEIGHTS
        with open(os.path.join(run, name), "r+b") as f:
            f.truncate(200)
    before = sorted(os.walk(tmp_path)), sorted(os.walk(fake_run))
    if case in ("missing_adapter", "damaged_adapter"):  # as a user meets them: a subprocess, with a one-line stderr
        r = run_eval_cli(*args)
        code, stderr = r.returncode, r.stderr
    else:  # the others in-process: each subprocess costs ~3 s of library imports
        import eval as eval_script
        monkeypatch.setattr(sys, "argv", ["eval.py", *args])
        monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # one_line_errors may replace it; restore after
        try:  # one_line_errors' excepthook does this in a real process
            eval_script.main()
            code = 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
        except SystemExit as e:  # argparse's errors
            code = e.code
        code, stderr = code, capsys.readouterr().err
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert (sorted(os.walk(tmp_path)), sorted(os.walk(fake_run))) == before  # nothing written


@pytest.mark.slow
def test_cli_reproduces_a_train_rid_run(trained, tmp_path):
    """A real (tiny) soup run of train_rid.py, each adapter weighted 0.5: eval.py rebuilds every stage from the saved
    adapters and the recorded weights and gets the training-time matrix and structure."""
    out, _ = trained("soup", "--soup_weight", "0.5")
    r = run_eval_cli("--run", str(out), "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    old, new = (json.load(open(d / "results.json")) for d in (out, tmp_path / "again"))
    assert old["adapters"][2] == ["adapters/task1_brightness", "adapters/task2_saturation"]
    assert old["adapter_weights"][2] == [0.5, 0.5]
    assert np.abs(np.array(new["matrix"]) - np.array(old["matrix"])).max() < 1e-6
    # SSIM divides by small local variances, so float-order differences in the weighted adapter sum move it in the
    # 6th digit (2.5e-6 seen on another machine); a wrong stage would move it by far more than 1e-4.
    for a, b in zip(old["structure"][1:], new["structure"][1:]):
        assert a["ssim"]["mean"] == pytest.approx(b["ssim"]["mean"], abs=1e-4)
    assert old["structure"][2]["ssim"]["mean"] < 0.999  # training changed the images
    assert not (out / "eval").exists()  # --out was honoured


def test_results_json_is_written_last(tmp_path, monkeypatch):
    """results.json marks a run finished: if drawing a picture fails (or the process dies there), it is not written,
    while the files before it are."""
    import report
    from eval import ril_metrics

    def broken(*args):
        raise RuntimeError("killed while drawing")
    monkeypatch.setattr(report, "draw_heatmap", broken)
    matrix = [[0.5, 0.4], [0.6, 0.4], [0.55, 0.6]]
    results = {"rewards": ["brightness", "saturation"], "method": "rid", "matrix": matrix, "matrix_se": matrix,
               "structure": [{}, {}, {}], "config": {"model": "x"}, **ril_metrics(matrix)}
    with pytest.raises(RuntimeError, match="killed while drawing"):
        report.write_files(str(tmp_path), results, [torch.rand(2, 3, 8, 8)] * 3)
    assert (tmp_path / "results.md").is_file() and (tmp_path / "grid.png").is_file()
    assert not (tmp_path / "results.json").exists()
