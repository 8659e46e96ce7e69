"""
losses.py: the losses of one training step, for every method, side by side. Copy this file and sample.py into your
own code; train_rid.py's loop and bench.py both call these, so the benchmark times the step that training runs.

    L = -mean_b r_k(x_0^b) / s_k                     every method: the reward, back through the last K DDIM steps
                                                     (DRaFT-K) and the decode
      + lambda * mean (eps_student - sg(eps_teacher))^2   rid: match the EMA teacher at the K window steps (and at M
                                                     steps of the no-grad part with --rid_trajectory M), the mean
                                                     over steps, both guidance branches and every element
      + w * sum_layers || (alpha / r) B A ||_F^2     l2: pull the current adapter's weight change dW_k towards 0
    after optimizer.step():  A_ema <- m A_ema + (1 - m) A, and B alike   rid: the teacher follows the student

Symbols, as in docs/method.md: task k of T, its reward r_k and s_k, the reward's spread on the base model's images;
the adapter of task k, dW_k = (alpha / r) B A (LoRA's factors: A down, B up); t a diffusion timestep, x_t the latent
there; sg stop-gradient. RID (Wang et al. 2024) names an adapter group and momentum distillation from an EMA teacher;
the form of the loss is our reconstruction (docs/method.md).

    from losses import step_losses, ema_update, l2_pull
    r, loss_rid = step_losses(pipe, reward, prompts, latents, ddim_steps=20, grad_steps=1, teacher=ema)
"""
import torch
from torch.utils.checkpoint import checkpoint

from sample import (checkpoint_blocks, denoise, denoiser_context, encode_prompts, encode_uncond, lora_params,
                    predict_x0_eps, sample)


def step_losses(pipe, reward, prompts, latents, ddim_steps, guidance_scale=7.5, eta=0.0, grad_steps=1, teacher=None,
                checkpointing=True, checkpoint_decode=False, checkpoint_reward=False, generator=None, extra_steps=()):
    """The forward half of a training step on one micro-batch: guided DDIM from `latents` with the K-step grad window,
    the decode, the reward, and (with a teacher) RID's matching loss at the K window steps and at `extra_steps`, step
    indices before the window (--rid_trajectory: x_t there comes from the no-grad pass, which visits it anyway). The
    caller weights the terms, sums them and backpropagates.
    -> (rewards (B,) fp32 with graph, teacher loss (scalar; 0 without one))."""
    size = tuple(s * pipe.vae_scale for s in latents.shape[-2:])
    cond, uncond = encode_prompts(pipe, prompts, size), encode_uncond(pipe, len(prompts), size)
    assert all(0 <= i < ddim_steps - grad_steps for i in extra_steps), (extra_steps, ddim_steps, grad_steps)
    matched = (*extra_steps, *range(ddim_steps - grad_steps, ddim_steps)) if teacher is not None else ()
    images, captured = sample(pipe, cond, uncond, latents, ddim_steps, guidance_scale, eta, grad_steps=grad_steps,
                              checkpointing=checkpointing, checkpoint_decode=checkpoint_decode, generator=generator,
                              capture=matched)
    dtype = cond["encoder_hidden_states"].dtype
    if checkpoint_reward:  # keep only the images; the reward network runs again in backward (memory for time)
        r = checkpoint(reward, images.to(dtype), prompts, use_reentrant=False).float()
    else:
        r = reward(images.to(dtype), prompts).float()  # (B,)
    if teacher is None:
        return r, torch.zeros((), device=r.device)
    context = denoiser_context(pipe, cond, uncond, guidance_scale, len(latents))  # as the sampler called it
    return r, teacher_loss(pipe, captured, context, teacher, checkpointing)


def teacher_loss(pipe, captured, context, teacher, checkpointing=True):
    """RID's momentum distillation: (eps_student(x_t, t, c) - sg(eps_teacher(x_t, t, c)))^2, its mean over the matched
    steps (the K grad-window steps, and any before them), both guidance branches' raw outputs (before guidance mixes
    them) and every element. A mean, not a sum: the default lambda = 3 is set against it (docs/experiments.md).
    The error is measured on eps whatever the model predicts (our choice): both raw outputs are converted first, so a
    v-prediction model (SD 2.x) is matched on sqrt(abar_t) (v_student - v_teacher), not on v itself. SD 3 and FLUX.1
    are matched on the velocity they predict, their own output (docs/method.md says why; FLUX.1 has one branch).
    x_t is data here, as the teacher sees it: the student's output is reused where x_t carries no graph and the output
    does (the first grad-window step); it is recomputed with grad on the detached x_t at the later window steps, whose
    x_t would otherwise pass the matching gradient back into the steps before them, and at steps before the window,
    whose output the no-grad pass made without a graph.
    captured: {i: (t, x_t, raw)} from sample(capture=...); context: the (2B or B rows) context the sampler used.
    teacher:  {parameter name: tensor} that replace the current adapter's weights (its EMA) for the teacher,
      through torch.func.functional_call: no adapter switch, so checkpointed recomputes stay correct."""
    losses = []
    guided = context["encoder_hidden_states"].shape[0] == 2 * next(iter(captured.values()))[1].shape[0]
    for t, x, student in captured.values():  # student: the sampler's raw output at x_t, both branches
        x_in = torch.cat([x, x]).detach() if guided else x.detach()  # (2B or B, C, h, w)
        if x.requires_grad or student.grad_fn is None:  # one more student forward, with grad, at the detached x_t
            checkpoint_blocks(pipe.denoiser, checkpointing)  # as in the sampler's window: per block
            student = denoise(pipe.denoiser, x_in, t, context)
        with torch.no_grad():  # the teacher costs one no-grad forward per window step, nothing more
            teacher_raw = denoise(pipe.denoiser, x_in, t, context, weights=teacher)
        diff = matched_space(pipe, student, x_in, t) - matched_space(pipe, teacher_raw, x_in, t)
        losses.append(diff.pow(2).mean())  # the mean over every element of both branches
    return torch.stack(losses).mean()  # and over the window's steps


def matched_space(pipe, raw, x_t, t):
    """The space RID matches in: eps for the DDIM families (whatever they predict), the velocity for SD 3, FLUX.1."""
    if pipe.flow:
        return raw
    # alpha-bar at t, gathered on t's device from the scheduler's table (which stays on the CPU); t stays a tensor
    abar_t = pipe.scheduler.alphas_cumprod.to(t.device)[t.view(1)].squeeze(0)
    return predict_x0_eps(raw, x_t, abar_t, pipe.scheduler.config.prediction_type)[1]


def unet_calls_per_step(ddim_steps, grad_steps, rid, checkpointing, extra_steps=0):
    """UNet calls per image of one training step, as step_losses makes them: S sampling calls, the K window calls
    once more in backward when checkpointed, and for RID K + M teacher calls and K - 1 + M student calls at detached
    x_t (each re-run in backward when checkpointed), M = extra_steps before the window. -> {"forward", "backward"}"""
    S, K, M, again = ddim_steps, grad_steps, extra_steps if rid else 0, int(checkpointing)
    student = K - 1 + M
    return {"forward": S + K * again + (K + M + student * (1 + again) if rid else 0),
            "backward": K + (student if rid else 0)}


def ema_update(ema, params, momentum):
    """RID's EMA teacher, right after optimizer.step(): A_ema <- m A_ema + (1 - m) A, in place, for every tensor of the
    current adapter. It runs over the LoRA factors A and B, not their product B A (our choice, not in the paper: it
    costs two small tensors per layer; an EMA of the factors is not the EMA of the product, but both start at the
    model after the previous task and follow the student as m shrinks)."""
    torch._foreach_lerp_(list(ema.values()), [p.detach() for p in params.values()], 1 - momentum)


def l2_pull(unet, name):
    """The `l2` baseline's penalty: sum over layers of || (alpha / r) B A ||_F^2, the squared Frobenius norm of the
    weight change adapter `name` makes (0 = the model after the previous task). Computed through the r x r
    products trace((B^T B)(A A^T)), never the full matrix."""
    params, total = lora_params(unet, name), 0.0
    for k, a in params.items():
        if ".lora_A." not in k:
            continue
        b = params[k.replace(".lora_A.", ".lora_B.")]  # A (r, in) or conv (r, in, kh, kw); B (out, r)
        a, b = a.flatten(1), b.flatten(1)
        scale = unet.get_submodule(k.rsplit(".lora_A.", 1)[0]).scaling[name]  # alpha / r
        total = total + scale ** 2 * ((b.T @ b) * (a @ a.T)).sum()
    return total


def joint_reward(rewards, scales):
    """--method joint's reward: the mean over all tasks of each reward divided by its scale s_k, one (B,) score, so
    that one adapter is trained on every task at once (the upper reference of continual learning, docs/method.md)."""
    return lambda images, prompts: sum(r(images, prompts).float() / s for r, s in zip(rewards, scales)) / len(rewards)
