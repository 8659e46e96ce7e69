"""RID's teacher, tested where it lives: the teacher-matching loss against a direct forward with the EMA weights
swapped into the adapter, the loss in eps space on a v-prediction model and at detached x_t inside a K = 2 window
(both against the formula by hand), the EMA update against its formula, no gradient ever reaching the EMA tensors,
and the L2 baseline's penalty against the dense weight change. In a real train_rid.py run: the teacher loss is exactly 0 at the first step of every task and above 0
after, and the EMA after one step is m * A_0 + (1 - m) * A_1 (m = 1: the adapter's initial weights, B = 0)."""
import json

import pytest
import torch

import losses
import sample
from common import seed_for

PROMPTS = ["a red circle", "a green square"]


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    """The tiny SD pipe with a frozen first adapter (B random) and a second, trainable one (B random as well)."""
    return lora_pipe(tiny_sd)


def sampled(pipe, capture, grad_steps=1, steps=5):
    cond, uncond = sample.encode_prompts(pipe, PROMPTS), sample.encode_uncond(pipe, 2)
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(1))
    images, captured = sample.sample(pipe, cond, uncond, latents, steps, 7.5, grad_steps=grad_steps, capture=capture)
    return images, captured, sample.cat_context(uncond, cond)


def perturbed_ema(pipe, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {k: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for k, p in sample.lora_params(pipe.denoiser, "task2").items()}


def test_teacher_loss_equals_a_forward_with_the_ema_swapped_in(pipe):
    """functional_call with the EMA weights = copying them into the adapter and calling the UNet; the frozen first
    adapter stays in both (the teacher is W0 + A_1 + EMA(A_2)). At both steps of a K = 2 grad window."""
    ema = perturbed_ema(pipe)
    _, captured, context = sampled(pipe, capture={3, 4}, grad_steps=2)
    loss = losses.teacher_loss(pipe, captured, context, ema)
    params = sample.lora_params(pipe.denoiser, "task2")
    saved = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        students = [sample.denoise(pipe.denoiser, torch.cat([x, x]), t, context) for t, x, _ in captured.values()]
        for k, p in params.items():
            p.copy_(ema[k])
        targets = [sample.denoise(pipe.denoiser, torch.cat([x, x]), t, context) for t, x, _ in captured.values()]
        for k, p in params.items():
            p.copy_(saved[k])
    direct = torch.stack([(s - t).pow(2).mean() for s, t in zip(students, targets)]).mean()
    assert direct > 0
    torch.testing.assert_close(loss.detach(), direct, rtol=1e-5, atol=0)
    # the teacher is not the student: without the swap the loss would be 0
    assert losses.teacher_loss(pipe, captured, context, {k: p.detach() for k, p in params.items()}).item() == 0


def lora_pipe(folder, seed=0):
    """A tiny pipe with a frozen first adapter (B random) and a second, trainable one (B random as well)."""
    p = sample.load_pipeline(folder)
    torch.manual_seed(seed)
    for name in ("task1", "task2"):
        sample.add_lora(p.denoiser, name, 4, 8.0)
        with torch.no_grad():
            for k, w in sample.lora_params(p.denoiser, name).items():
                if "lora_B" in k:
                    w.normal_(0, 0.3)
    sample.set_adapters(p.denoiser, ["task1", "task2"], trainable="task2")
    return p


def by_hand(pipe, captured, context, ema, kind):
    """RID's loss written out: at each matched step, the student and the teacher (EMA copied into the adapter) at
    the detached x_t, both outputs turned into eps by hand, the squared error averaged over elements and steps."""
    params = sample.lora_params(pipe.denoiser, "task2")
    saved = {k: p.detach().clone() for k, p in params.items()}
    steps = [(t, torch.cat([x, x]).detach()) for t, x, _ in captured.values()]
    with torch.no_grad():  # teachers first: copying weights in place must not touch a graph that is still needed
        for k, p in params.items():
            p.copy_(ema[k])
        teachers = [sample.denoise(pipe.denoiser, x_in, t, context) for t, x_in in steps]
        for k, p in params.items():
            p.copy_(saved[k])
    losses = []
    for (t, x_in), teacher in zip(steps, teachers):
        student = sample.denoise(pipe.denoiser, x_in, t, context)
        a = pipe.scheduler.alphas_cumprod[t]
        eps = {"epsilon": lambda out: out, "v_prediction": lambda v: a.sqrt() * v + (1 - a).sqrt() * x_in}[kind]
        losses.append((eps(student) - eps(teacher)).pow(2).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_teacher_loss_is_on_eps_for_every_prediction_type(kind, tiny_sd, tmp_path):
    """On a v-prediction model the loss is || eps_s - eps_t ||^2 = abar_t || v_s - v_t ||^2, not the raw v error;
    and with K = 2 the window's second step matches at the detached x_t: its matching gradient does not flow back
    into the first window step through x_t. Loss and LoRA gradient against the formula computed by hand."""
    from test_sample import variant
    folder = variant(tiny_sd, tmp_path, scheduler={"prediction_type": kind})
    p = lora_pipe(folder)
    ema = perturbed_ema(p)
    params = sample.lora_params(p.denoiser, "task2")
    _, captured, context = sampled(p, capture={3, 4}, grad_steps=2)  # both steps of the window
    assert captured[4][1].requires_grad  # the second window step's x_t carries the first one's graph
    loss = losses.teacher_loss(p, captured, context, ema)
    loss.backward()
    ours = {k: w.grad.clone() for k, w in params.items()}
    for w in params.values():
        w.grad = None
    hand = by_hand(p, captured, context, ema, kind)
    hand.backward()
    torch.testing.assert_close(loss.detach(), hand.detach(), rtol=1e-5, atol=0)
    for k, w in params.items():
        torch.testing.assert_close(ours[k], w.grad, rtol=1e-4, atol=1e-9)
    if kind == "v_prediction":  # the raw-output loss is a different number
        raw = torch.stack([(sample.denoise(p.denoiser, torch.cat([x, x]), t, context).detach() - 0).pow(2).mean()
                           for t, x, _ in captured.values()])
        assert not torch.allclose(hand.detach(), raw.mean())


def test_trajectory_matching_adds_early_steps_by_hand_with_their_gradient(pipe):
    """--rid_trajectory: with K = 1 and extra steps 0 and 2 of 5, the loss and its gradient are those of the formula
    by hand at steps 0, 2 and 4, the early steps' x_t taken from the no-grad pass. Reusing the no-grad pass's output
    at an early step would leave the loss right and its gradient short of those steps. Then the UNet calls that
    step_losses makes, forward and backward, counted on the last checkpointed block, which every adapter gradient passes (each recompute in backward counts) against
    unet_calls_per_step."""
    ema, params = perturbed_ema(pipe, seed=5), sample.lora_params(pipe.denoiser, "task2")
    latents = sample.initial_latents(pipe, 2, torch.Generator().manual_seed(1))  # as sampled() draws them
    block, calls = pipe.denoiser.up_blocks[-1].resnets[-1], []  # (a forward hook does not see the recomputes)
    block.forward = lambda *a, forward=block.forward, **k: calls.append(1) or forward(*a, **k)
    try:
        _, loss = losses.step_losses(pipe, lambda im, p: im.mean((1, 2, 3)), PROMPTS, latents, 5, grad_steps=1,
                                     teacher=ema, extra_steps=(0, 2))
        loss.backward()
        counted = len(calls)
    finally:
        del block.forward
    got = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    _, captured, context = sampled(pipe, capture={0, 2, 4})
    hand = by_hand(pipe, captured, context, ema, "epsilon")
    hand.backward()
    torch.testing.assert_close(loss.detach(), hand.detach(), rtol=1e-5, atol=0)
    for k, p in params.items():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-8)
        p.grad = None
    # the window step alone gives a different gradient: the early steps do reach the adapter
    _, loss = losses.step_losses(pipe, lambda im, p: im.mean((1, 2, 3)), PROMPTS, latents, 5, grad_steps=1, teacher=ema)
    loss.backward()
    assert any(not torch.allclose(p.grad, got[k]) for k, p in params.items())
    for p in params.values():
        p.grad = None
    want = losses.unet_calls_per_step(5, 1, True, True, extra_steps=2)
    assert counted == want["forward"] == 5 + 1 + (1 + 2) + 2 * 2 and want["backward"] == 1 + 2


def test_ema_update_formula_and_no_gradient_reaches_the_ema(pipe):
    params = sample.lora_params(pipe.denoiser, "task2")
    ema = perturbed_ema(pipe, seed=3)
    before = {k: v.clone() for k, v in ema.items()}
    # a full training step's forward and backward: the EMA takes part in the teacher loss only
    r, loss_rid = losses.step_losses(pipe, lambda im, p: im.mean((1, 2, 3)), PROMPTS,
                                     sample.initial_latents(pipe, 2, torch.Generator().manual_seed(4)), 4,
                                     grad_steps=2, teacher=ema)
    (-r.mean() + loss_rid).backward()
    assert loss_rid > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(not v.requires_grad and v.grad is None for v in ema.values())
    # After n updates towards fixed weights A, an EMA that started at E_0 is A + m^n (E_0 - A): the gap shrinks
    # geometrically, m = 0 jumps to A, m = 1 never moves.
    for m, n in ((0.9, 5), (0.0, 1), (1.0, 3)):
        ema = {k: v.clone() for k, v in before.items()}
        for _ in range(n):
            losses.ema_update(ema, params, m)
        for k in ema:
            a = params[k].detach()
            torch.testing.assert_close(ema[k], a + m ** n * (before[k] - a), rtol=1e-5, atol=1e-7)
    for p in params.values():
        p.grad = None


def test_l2_penalty_is_the_squared_norm_of_the_dense_weight_change(pipe):
    total = 0.0
    for name, module in pipe.denoiser.named_modules():
        if hasattr(module, "lora_A") and "task2" in module.lora_A:
            delta = module.scaling["task2"] * module.lora_B["task2"].weight @ module.lora_A["task2"].weight
            total = total + delta.pow(2).sum()
    ours = losses.l2_pull(pipe.denoiser, "task2")
    assert ours > 0 and ours.requires_grad
    torch.testing.assert_close(ours.detach(), total.detach(), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_teacher_loss_in_a_real_run_and_the_ema_after_one_step(trained, tiny_sd, tmp_path):
    """train_rid.py --method rid: the log's teacher loss is exactly 0 at step 1 of each task (the new adapter has
    B = 0, so the EMA teacher is the student, at the K window steps), above 0 after.
    Stopped after step 1 of task 1 (SIGTERM through the fault injection), the checkpoint's EMA is m * A_0 + (1 - m) * A_1,
    A_0 the adapter as created (rebuilt here from its seed) and A_1 the adapter after the step; with m = 1 it is A_0
    itself, whose B is 0: the previous model."""
    from conftest import train
    from test_train import METHOD_FLAGS
    full, _ = trained("rid", *METHOD_FLAGS["rid"])  # 3 steps per task
    log = [json.loads(line) for line in open(full / "log.jsonl")]
    assert [row["loss_rid"] == 0 for row in log] == [True, False, False] * 2
    for m in ("0.9", "1"):
        out = tmp_path / f"m{m}"
        r = train(tiny_sd, out, "--iters", "3", "--ema_momentum", m, env={"RID_FAULT_SIGNAL_STEP": "1"})
        assert r.returncode == 130, r.stderr[-2000:]
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert (ckpt["task"], ckpt["step"]) == (0, 1)
        fresh = sample.load_pipeline(tiny_sd)
        torch.manual_seed(seed_for("lora", 0, 0))
        sample.add_lora(fresh.denoiser, "task1", 4, 8.0)  # RUN's --lora_alpha 8
        a0 = {k: p.detach() for k, p in sample.lora_params(fresh.denoiser, "task1").items()}
        a1 = ckpt["adapters"]["task1"]
        for k, v in ckpt["ema"].items():
            torch.testing.assert_close(v, float(m) * a0[k] + (1 - float(m)) * a1[k], rtol=1e-6, atol=1e-8)
            if m == "1":
                assert torch.equal(v, a0[k]) and ("lora_B" not in k or not v.any())
