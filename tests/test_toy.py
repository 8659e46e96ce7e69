"""The toy world: the caption checker is exact and not trivially true, the held-out split really holds
combinations out, and the shipped toy_model/ loads through the real from_pretrained path and still
draws what its captions ask for."""
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import toy  # noqa: E402

MODEL = ROOT / "toy_model"


def test_checker_is_exact_on_real_images():
    for split in ("train", "heldout"):
        captions = toy.toy_captions(512, seed=11, split=split)
        rates = toy.match_rates(toy.render(captions, seed=12), captions)
        assert min(rates.values()) >= 0.98, (split, rates)


def test_checker_rejects_wrong_captions():
    captions = toy.toy_captions(384, seed=21)
    images = toy.render(captions, seed=22)
    wrong = {"colour": [], "shape": [], "background": [], "swapped": []}
    for i, cap in enumerate(captions):
        c, s, b = toy.parse_caption(cap)
        others = [n for n in toy.NAMES if n not in (c, b)]  # a wrong colour that is not the other one either
        wrong["colour"].append(f"a {others[i % len(others)]} {s} on a {b} background")
        wrong["background"].append(f"a {c} {s} on a {others[i % len(others)]} background")
        wrong["shape"].append(f"a {c} {toy.SHAPES[(toy.SHAPES.index(s) + 1 + i % 2) % 3]} on a {b} background")
        # the two colours swapped: a red circle on blue is not a blue circle on red
        wrong["swapped"].append(f"a {b} {s} on a {c} background")
    for key in ("colour", "shape", "background"):
        assert toy.check_captions(images, wrong[key])[key].float().mean() < 0.02, key
    swapped = toy.check_captions(images, wrong["swapped"])
    assert (swapped["colour"] | swapped["background"]).float().mean() < 0.02
    # a flat background (what reward hacking collapses to) has no shape and no shape colour
    flat = images[:, :, :1, :1].expand_as(images)
    checks = toy.check_captions(flat, captions)
    assert not checks["shape"].any() and not checks["colour"].any() and checks["background"].all()
    # a blob of the right colour is not a shape: a plus sign (arms 5 px wide) matches none of the three
    cross = images[:, :, :1, :1].repeat(1, 1, 32, 32)
    fg = torch.tensor([toy.COLOURS[toy.parse_caption(c)[0]] for c in captions])[:, :, None, None]
    cross[:, :, 6:27, 14:19] = fg
    cross[:, :, 14:19, 6:27] = fg
    checks = toy.check_captions(cross, captions)
    assert checks["colour"].all() and checks["background"].all() and not checks["shape"].any()


def test_heldout_split_holds_out_triples_but_no_pairs():
    train, heldout = set(toy.all_captions("train")), set(toy.all_captions("heldout"))
    assert not train & heldout and len(train | heldout) == len(toy.NAMES) * (len(toy.NAMES) - 1) * len(toy.SHAPES)
    assert set(toy.toy_captions(5000, seed=0, split="train")) == train  # the sampler never leaves its split
    assert set(toy.toy_captions(1000, seed=0, split="heldout")) == heldout
    # every pair of words in a held-out caption was seen together in training (composition, not new words)
    parsed = [toy.parse_caption(c) for c in train]
    for c, s, b in map(toy.parse_caption, heldout):
        assert any(p[:2] == (c, s) for p in parsed) and any((p[0], p[2]) == (c, b) for p in parsed)
        assert any(p[1:] == (s, b) for p in parsed)


def test_shipped_model_is_small_and_in_diffusers_format():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40e6
    weights = {p.relative_to(MODEL).parts[0] for p in files if p.suffix == ".safetensors"}
    assert weights == {"unet", "vae", "text_encoder"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    # diffusers' own loader takes it like a hub model: a DDIM scheduler, no safety checker
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    # the remake builds the very same tokenizer (ids fixed, not left to a trainer's tie-breaking)
    assert toy.build_tokenizer().get_vocab() == pipe.tokenizer.get_vocab()


@pytest.fixture(scope="module")
def shipped_samples():
    # the real loading path (from_pretrained of each part, in sample.load_pipeline) and the project's sampler
    captions = toy.toy_captions(48, seed=31, split="heldout")
    images = toy.sample_toy(str(MODEL), captions, seed=32, ddim_steps=20, guidance_scale=7.5)
    return images, captions


def test_shipped_model_follows_heldout_captions(shipped_samples):
    images, captions = shipped_samples
    assert images.shape == (48, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    rates = toy.match_rates(images, captions)
    # chance is 1/8 for each colour and 1/3 for the shape; the shipped model scores 0.969 or more (docs/toy_world.md)
    assert rates["colour"] >= 0.7 and rates["background"] >= 0.7 and rates["shape"] >= 0.6, rates


def test_shipped_model_samples_depend_on_the_caption(shipped_samples):
    # the same images against the captions of other images must mostly fail: a model that draws one
    # fixed picture, or a checker that says yes to everything, fails here
    images, captions = shipped_samples
    rolled = captions[1:] + captions[:1]
    same = [a == b for a, b in zip(captions, rolled)]
    checks = toy.check_captions(images, rolled)
    allmatch = (checks["colour"] & checks["shape"] & checks["background"]).float()
    assert allmatch[[not s for s in same]].mean() < 0.3


@pytest.mark.slow
def test_remake_script_runs_and_never_clobbers(tmp_path):
    # the real script end to end, a few steps of each stage: a loadable pipeline folder, no temp leftovers
    import subprocess
    out = tmp_path / "toy_tiny"
    cmd = [sys.executable, str(ROOT / "toy.py"), "--out", str(out), "--vae_steps", "2", "--unet_steps", "2",
           "--vae_batch", "4", "--unet_batch", "4", "--scale_n", "64", "--warmup", "1", "--eval_n", "4",
           "--ddim_steps", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out caption match, 4 captions" in run.stdout and "unet step" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_tiny"]
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in out.iterdir()}
    # a second run into the same folder is refused before any training, and leaves it as it was
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
