"""Shared fixtures: a tiny Stable Diffusion pipeline with random weights, saved in the hub's on-disk format
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), so tests run the real from_pretrained
code offline. Everything here builds in about a second on a CPU."""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach a hub from the tests
# OpenMP threads that spin while waiting make tiny ops up to 100x slower whenever another process shares the
# cores (measured: 14 ms vs 1.3 s per tiny UNet call on 2 busy cores). Set before torch loads; subprocesses inherit.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_tokenizer(folder):
    """A CLIP BPE tokenizer with a character-level vocabulary and no merges, written as vocab.json + merges.txt
    (transformers 5 silently ignores CLIPTokenizer(vocab_file=...), so we load it back from the folder)."""
    import string
    from transformers import CLIPTokenizer
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)  # byte-level BPE maps these to themselves
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=16)
    assert tok("red")["input_ids"][1:-1] == [vocab["r"], vocab["e"], vocab["d</w>"]]
    return tok


def build_tiny_pipeline(folder, seed=0):
    """Random-weight SD pipeline: 32x32 images, 16x16x4 latents, ~0.2M parameters. Scheduler saved as SD 1.5's
    PNDM config, as on the hub, so loading exercises the PNDM -> DDIM config path."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(os.path.join(folder, "_tok"))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    # Random weights give near-flat images; larger conv_out weights give images with visible structure, so
    # that pixel comparisons in the tests are meaningful.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(2)
        unet.conv_out.weight.mul_(5)
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)  # its config file is replaced below
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # The scheduler config exactly as SD 1.5's hub repo has it (PNDM, with clip_sample false, which a
    # PNDMScheduler built in code would not write and which a DDIM built from its config would default to true).
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                   "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                   "clip_sample": False}, f)
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Path of a tiny SD-format model folder (built once per test session)."""
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_sd")))
