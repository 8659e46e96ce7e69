"""bench.py runs end to end at a tiny size and writes every figure: once on the tiny SD folder of conftest.py (every
code path of the training step: micro-batches, matched steps, both checkpoint levers) and once on sd15-arch, the
real SD 1.5 shapes at 32 px, 1 DDIM step. Not a timed test: nothing here asserts a speed."""
import json
import math
import os
import subprocess
import sys

from conftest import ROOT

PHASES = ("sample", "diffusers", "adapters", "rid")
TABLE = ("| (a) rid sampler, no grad |", "| (b) diffusers StableDiffusionPipeline |", "| (c) train step, adapters |",
         "| (d) train step, rid |", "| (a)/(b) ours vs diffusers |", "| (c)/(a) train step", "| (d)/(c) rid vs adapters |")


def run_bench(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def check_figures(path, stdout):
    with open(path) as f:
        figures = json.load(f)
    assert set(figures["phases"]) == set(PHASES)
    for name in PHASES:
        phase = figures["phases"][name]
        for key in ("median_s", "images_per_s", "peak_memory_bytes"):
            assert math.isfinite(phase[key]) and phase[key] > 0, (name, key, phase[key])
        assert phase["peak_memory_bytes"] >= 2**20  # bytes, not KB or GB: a process holding a model
    assert set(figures["ratios"]) == {"a_over_b", "c_over_a", "d_over_c"}
    assert set(figures["cpu_ratios"]) == set(figures["ratios"])  # on a CPU: the same ratios from process CPU time
    assert all(math.isfinite(v) and v > 0 for v in [*figures["ratios"].values(), *figures["cpu_ratios"].values()])
    assert figures["resident_before_bytes"] > 0 and figures["memory_kind"]
    for row in TABLE:
        assert row in stdout, row
    return figures


def test_bench_tiny_model(tiny_sd, tmp_path):
    out = tmp_path / "bench.json"
    r = run_bench("--model", tiny_sd, "--batch_size", "2", "--grad_accum", "2", "--ddim_steps", "4", "--grad_steps", "2",
                  "--match_steps", "1", "--checkpoint_decode", "--checkpoint_reward", "--warmup", "1", "--repeats", "1",
                  "--json", str(out))
    assert r.returncode == 0, r.stderr
    figures = check_figures(out, r.stdout)
    # (a) and (b) did the same work: in fp32 they make the same images (parity is tested in test_sample.py too)
    assert figures["max_abs_diff_a_b"] <= 1e-5
    assert figures["config"]["grad_accum"] == 2 and figures["height"] == 32


def test_bench_tiny_model_bf16(tiny_sd, tmp_path):
    """The GPU default: frozen networks in bf16, LoRA weights in fp32 (bench.py asserts it before timing)."""
    out = tmp_path / "bench.json"
    r = run_bench("--model", tiny_sd, "--batch_size", "2", "--ddim_steps", "4", "--grad_steps", "2", "--match_steps", "1",
                  "--dtype", "bfloat16", "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    figures = check_figures(out, r.stdout)
    assert figures["dtype"] == "bfloat16"
    # bf16 UNet calls in both samplers; ours keeps the DDIM arithmetic in fp32, so the images differ a little
    assert 0 < figures["max_abs_diff_a_b"] < 0.25


def test_bench_sd15_arch_small(tmp_path):
    """The SD 1.5 architecture and the ViT-L/14 aesthetic stand-in, built from their configs with random weights.
    fp32: on a CPU without bf16 instructions (AVX2 only, as on the CI machine) the bf16 backward ran 640 s; fp32
    runs in about 55 s at 32 px and one DDIM step, with 6 GiB resident. The bf16 path is run on the tiny model."""
    out = tmp_path / "sd15.json"
    r = run_bench("--model", "sd15-arch", "--height", "32", "--width", "32", "--batch_size", "1", "--ddim_steps", "1",
                  "--dtype", "float32", "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    figures = check_figures(out, r.stdout)
    assert figures["reward"] == "aesthetic-arch" and figures["dtype"] == "float32"
    assert "model sd15-arch (861M UNet parameters)" in r.stdout  # 859.5M of SD 1.5 + two rank-4 adapters


def test_sweep_command_lines_parse_back():
    """--sweep re-runs bench.py with one lever flipped: the command line it builds must parse back to the same flags."""
    sys.path.insert(0, ROOT)
    import bench
    args = bench.parser.parse_args(["--model", "sd15-arch", "--checkpoint_decode", "--grad_accum", "2", "--batch_size", "4"])
    config = {**vars(args), "dtype": "bfloat16", "no_checkpointing": True}
    assert vars(bench.parser.parse_args(bench.to_argv(config))) == config


def test_bad_flags_are_one_line():
    r = run_bench("--batch_size", "3", "--grad_accum", "2")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
