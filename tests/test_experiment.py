"""experiment.py end to end on the tiny SD folder: it runs train_rid.py per method and seed, its table agrees with
the runs' own results.json, a second call reuses finished runs, and a bad --vary is one line."""
import json
import os
import statistics
import subprocess
import sys

from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def experiment(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiment.py"), *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd)


def test_experiment_table_matches_its_runs(tiny_sd, tmp_path):
    args = ["--model", tiny_sd, "--rewards", "brightness,saturation", "--methods", "naive,rid", "--seeds", "0,1",
            "--iters", "2", "--batch_size", "2", "--eval_n", "2", "--out", "exp", "--",
            "--ddim_steps", "3", "--eval_batch_size", "2", "--lr", "0.02"]
    r = experiment(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("=== ") == 4  # 2 methods x 2 seeds, one train_rid.py each
    summary = json.load(open(tmp_path / "exp" / "summary.json"))
    assert set(summary["runs"]) == {"naive", "rid"}
    for method, folders in summary["runs"].items():
        assert [os.path.basename(f) for f in folders] == ["seed0", "seed1"]
        res = [json.load(open(tmp_path / f / "results.json")) for f in folders]
        assert all(x["method"] == method and x["config"]["lr"] == 0.02 for x in res)  # flags after -- arrive
        forgetting = [x["forgetting"][-1] for x in res]
        mean, sd = summary["summary"][method]["F_T"]
        assert abs(mean - statistics.mean(forgetting)) < 1e-12 and abs(sd - statistics.stdev(forgetting)) < 1e-12
        gains = [statistics.mean(x["matrix"][t][t - 1] - x["matrix"][t - 1][t - 1] for t in (1, 2)) for x in res]
        assert abs(summary["summary"][method]["new task"][0] - statistics.mean(gains)) < 1e-12
        assert (tmp_path / "exp" / f"grid_{method}.png").is_file()
    table = (tmp_path / "exp" / "table.md").read_text()
    assert "| naive |" in table and "| rid |" in table and "| 1.00 |" in table  # naive is its own reference
    # Run again: every run is reused, none retrained, and the table is the same.
    again = experiment(*args, cwd=tmp_path)
    assert again.returncode == 0 and "=== " not in again.stdout
    assert (tmp_path / "exp" / "table.md").read_text() == table


def test_experiment_bad_vary_is_one_line(tmp_path):
    r = experiment("--vary", "rid_lambda", "--out", "exp", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "KEY=v1,v2" in r.stderr
    assert not os.listdir(tmp_path)
