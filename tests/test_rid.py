"""RID's teacher, tested where it lives: the teacher-matching loss against a direct forward with the EMA weights
swapped into the adapter, the EMA update against its formula, no gradient ever reaching the EMA tensors, the
projected pull (PCGrad) against its formula, the x0 weighting, and the L2 baseline's penalty against the dense
weight change. In a real train_rid.py run: the teacher loss is exactly 0 at the first step of every task and above 0
after, and the EMA after one step is m * A_0 + (1 - m) * A_1 (m = 1: the adapter's initial weights, B = 0)."""
import json

import pytest
import torch

import sample

PROMPTS = ["a red circle", "a green square"]


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    """The tiny SD pipe with a frozen first adapter (B random) and a second, trainable one (B random as well)."""
    p = sample.load_pipeline(tiny_sd)
    torch.manual_seed(0)
    for name in ("task1", "task2"):
        sample.add_lora(p.unet, name, 4, 8.0)
        with torch.no_grad():
            for k, w in sample.lora_params(p.unet, name).items():
                if "lora_B" in k:
                    w.normal_(0, 0.3)
    sample.set_adapters(p.unet, ["task1", "task2"], trainable="task2")
    return p


def sampled(pipe, capture, grad_steps=1, steps=5):
    cond, uncond = sample.encode_prompts(pipe, PROMPTS), sample.encode_uncond(pipe, 2)
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(1))
    images, captured = sample.sample(pipe, cond, uncond, latents, steps, 7.5, grad_steps=grad_steps, capture=capture)
    return images, captured, sample.cat_context(uncond, cond)


def perturbed_ema(pipe, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {k: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for k, p in sample.lora_params(pipe.unet, "task2").items()}


def test_teacher_loss_equals_a_forward_with_the_ema_swapped_in(pipe):
    """functional_call with the EMA weights = copying them into the adapter and calling the UNet; the frozen first
    adapter stays in both (the teacher is W0 + A_1 + EMA(A_2)). At a grad-window step and at an earlier one."""
    ema = perturbed_ema(pipe)
    _, captured, context = sampled(pipe, capture={2, 4})
    loss = sample.teacher_loss(pipe, captured, context, ema)
    params = sample.lora_params(pipe.unet, "task2")
    saved = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        students = [sample.unet_eps(pipe.unet, torch.cat([x, x]), t, context) for t, x, _ in captured.values()]
        for k, p in params.items():
            p.copy_(ema[k])
        targets = [sample.unet_eps(pipe.unet, torch.cat([x, x]), t, context) for t, x, _ in captured.values()]
        for k, p in params.items():
            p.copy_(saved[k])
    direct = torch.stack([(s - t).pow(2).mean() for s, t in zip(students, targets)]).mean()
    assert direct > 0
    torch.testing.assert_close(loss.detach(), direct, rtol=1e-5, atol=0)
    # the teacher is not the student: without the swap the loss would be 0
    assert sample.teacher_loss(pipe, captured, context, {k: p.detach() for k, p in params.items()}).item() == 0


def test_x0_weighting_scales_each_step_by_its_noise_level(pipe):
    ema = perturbed_ema(pipe)
    _, captured, context = sampled(pipe, capture={1})
    eps = sample.teacher_loss(pipe, captured, context, ema, weighting="eps")
    x0 = sample.teacher_loss(pipe, captured, context, ema, weighting="x0")
    hybrid = sample.teacher_loss(pipe, captured, context, ema, weighting="hybrid")
    t = next(iter(captured.values()))[0]
    abar = pipe.scheduler.alphas_cumprod[t]
    torch.testing.assert_close(x0, eps * (1 - abar) / abar, rtol=1e-5, atol=0)
    torch.testing.assert_close(hybrid, eps * max(1.0, float((1 - abar) / abar)), rtol=1e-5, atol=0)


def test_ema_update_formula_and_no_gradient_reaches_the_ema(pipe):
    params = sample.lora_params(pipe.unet, "task2")
    ema = perturbed_ema(pipe, seed=3)
    before = {k: v.clone() for k, v in ema.items()}
    # a full training step's forward and backward: the EMA takes part in the teacher loss only
    r, loss_rid = sample.step_losses(pipe, lambda im, p: im.mean((1, 2, 3)), PROMPTS,
                                     sample.initial_latents(pipe, 2, torch.Generator().manual_seed(4)), 4,
                                     teacher=ema, matched={3, 1})
    (-r.mean() + loss_rid).backward()
    assert loss_rid > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(not v.requires_grad and v.grad is None for v in ema.values())
    m = 0.9
    sample.ema_update(ema, params, m)
    for k in ema:
        torch.testing.assert_close(ema[k], m * before[k] + (1 - m) * params[k].detach(), rtol=1e-6, atol=1e-7)
    for p in params.values():
        p.grad = None


def test_projected_pull_removes_only_what_opposes_the_reward():
    """The hook's result against PCGrad's formula, row by row: a conflicting row loses its component along the
    reward's gradient; an agreeing row keeps the whole pull."""
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])   # d(reward loss)/d out, per row
    pull = torch.tensor([[-1.0, 1.0, 0.0], [0.0, 1.0, 3.0]])  # row 0 conflicts (dot < 0), row 1 agrees
    out = sample.project_pull({"pull": pull.clone()}, g.clone())
    want = g + torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    torch.testing.assert_close(out, want)
    # End to end through autograd: a leaf `out`, a reward loss on it and the projected teacher term.
    leaf = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.3, -0.4]], requires_grad=True)
    target = torch.zeros(2, 3)
    holder = {}
    y = leaf * 1.0  # the sampler's output tensor that the hook sits on
    y.register_hook(lambda grad: sample.project_pull(holder, grad))
    lam = 2.0
    ((y * torch.tensor([[1.0, 0, 0], [0, 2.0, 0]])).sum() + lam * sample.ProjectedPull.apply(y, target, holder)).backward()
    raw = lam * 2 * (leaf.detach() - target) / 6
    expect = sample.project_pull({"pull": raw}, torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]))
    torch.testing.assert_close(leaf.grad, expect)


def test_rid_project_changes_the_gradient_as_its_formula_says(pipe):
    """--rid_project in a real sampler step: the LoRA gradient equals the reward's plus the projected pull, which
    differs from both the plain teacher term's and the reward's alone."""
    ema = perturbed_ema(pipe, seed=5)
    params = sample.lora_params(pipe.unet, "task2")
    reward = lambda im, p: (im * torch.linspace(0, 1, 32)).mean((1, 2, 3))

    def grads(project, lam):
        for p in params.values():
            p.grad = None
        r, loss_rid = sample.step_losses(pipe, reward, PROMPTS, sample.initial_latents(
            pipe, 2, torch.Generator().manual_seed(6)), 4, teacher=ema, matched={3}, project=project)
        (-r.mean() + lam * loss_rid).backward()
        return torch.cat([p.grad.flatten() for p in params.values()])
    reward_only, plain, projected = grads(False, 0.0), grads(False, 50.0), grads(True, 50.0)
    assert not torch.allclose(projected, plain) and not torch.allclose(projected, reward_only)
    # The projection keeps the pull's non-conflicting part: the projected gradient lies between the two, closer to
    # the reward's alone than the plain one along the reward's direction.
    along = lambda v: (v @ reward_only) / reward_only.norm()
    assert along(plain) < along(projected)


def test_l2_penalty_is_the_squared_norm_of_the_dense_weight_change(pipe):
    total = 0.0
    for name, module in pipe.unet.named_modules():
        if hasattr(module, "lora_A") and "task2" in module.lora_A:
            delta = module.scaling["task2"] * module.lora_B["task2"].weight @ module.lora_A["task2"].weight
            total = total + delta.pow(2).sum()
    ours = sample.lora_delta_sq(pipe.unet, "task2")
    assert ours > 0 and ours.requires_grad
    torch.testing.assert_close(ours.detach(), total.detach(), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_teacher_loss_in_a_real_run_and_the_ema_after_one_step(trained, tiny_sd, tmp_path):
    """train_rid.py --method rid: the log's teacher loss is exactly 0 at step 1 of each task (the new adapter has
    B = 0, so the EMA teacher is the student, at the K window steps and the extra matched one), above 0 after.
    Stopped after step 1 of task 1 (SIGTERM through the testing aid), the checkpoint's EMA is m * A_0 + (1 - m) * A_1,
    A_0 the adapter as created (rebuilt here from its seed) and A_1 the adapter after the step; with m = 1 it is A_0
    itself, whose B is 0: the previous model."""
    from conftest import train
    full, _ = trained("rid", "--match_steps", "1")  # 3 steps per task
    log = [json.loads(line) for line in open(full / "log.jsonl")]
    assert [row["loss_rid"] == 0 for row in log] == [True, False, False] * 2
    for m in ("0.9", "1"):
        out = tmp_path / f"m{m}"
        r = train(tiny_sd, out, "--iters", "3", "--ema_momentum", m, "--fault_signal_step", "1")
        assert r.returncode == 130, r.stderr[-2000:]
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert (ckpt["task"], ckpt["step"]) == (0, 1)
        fresh = sample.load_pipeline(tiny_sd)
        torch.manual_seed(sample.seed_for("lora", 0, 0))
        sample.add_lora(fresh.unet, "task1", 4, 8.0)  # RUN's --lora_alpha 8
        a0 = {k: p.detach() for k, p in sample.lora_params(fresh.unet, "task1").items()}
        a1 = ckpt["adapters"]["task1"]
        for k, v in ckpt["ema"].items():
            torch.testing.assert_close(v, float(m) * a0[k] + (1 - float(m)) * a1[k], rtol=1e-6, atol=1e-8)
            if m == "1":
                assert torch.equal(v, a0[k]) and ("lora_B" not in k or not v.any())
