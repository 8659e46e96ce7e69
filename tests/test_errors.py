"""Bad input, tried as a new user would: every mistake gets one line on stderr that names the problem and the fix,
exit code 2, no traceback, and no file written (an earlier run's files untouched)."""
import os
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT
from common import UserError

OK = ["--rewards", "brightness", "--iters", "2", "--ddim_steps", "4", "--batch_size", "2", "--eval_n", "2"]


def train_cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_rid.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def listing(folder):
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getmtime(os.path.join(d, f)))
                  for d, _, files in os.walk(folder) for f in files)


CASES = {  # name: (arguments, a word the message must contain)
    "unknown reward": (["--rewards", "brightness,beauty"], "beauty"),
    "empty rewards": (["--rewards", ","], "--rewards"),
    "unknown method": (["--method", "ewc"], "method"),
    "negative l2 weight": (["--l2_weight", "-1"], "--l2_weight"),
    "missing prompt file": (["--prompts", "nope.txt"], "nope.txt"),
    "empty prompt file": (["--prompts", "empty.txt"], "empty.txt"),
    "K above steps": (["--grad_steps", "9"], "--grad_steps"),
    "negative K": (["--grad_steps", "-1"], "--grad_steps"),
    "M beyond the steps before the window": (["--method", "rid", "--rid_trajectory", "8"], "--rid_trajectory"),
    "zero batch": (["--batch_size", "0"], "--batch_size"),
    "zero iters": (["--iters", "0"], "--iters"),
    "negative guidance": (["--guidance_scale", "-1"], "--guidance_scale"),
    "eta above 1": (["--eta", "1.5"], "--eta"),
    "batch not divisible": (["--batch_size", "3", "--grad_accum", "2"], "divisible"),
    "bad reward path": (["--reward_path", "hps"], "--reward_path"),
    "missing model": (["--model", "no_such_dir/"], "no_such_dir"),
    "not an SD folder": (["--model", "plain_dir"], "plain_dir"),
    "hub id offline": (["--model", "someone/not-downloaded"], "someone/not-downloaded"),
    "resume without checkpoint": (["--resume"], "--resume"),
    "damaged checkpoint": (["--out", "unfinished", "--resume"], "damaged"),
    "negative seed": (["--seed", "-1"], "--seed"),
    "seed not an integer": (["--seed", "4.5"], "--seed"),
    "seed above 2^64 - 1": (["--seed", str(2**64)], "--seed"),
    "negative height": (["--height", "-16"], "--height"),
    "finished run": (["--out", "finished"], "finished run"),
    "unfinished run": (["--out", "unfinished"], "--resume"),
}


@pytest.fixture
def workdir(tmp_path, tiny_sd):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "plain_dir" / "notes.txt").write_text("not a model")
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "results.json").write_text('{"earlier": "run"}')
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "checkpoint.pt").write_bytes(b"earlier run")
    return tmp_path


def train_in_process(args, cwd, monkeypatch, capsys):
    """train_rid.py run in this process (runpy), as the CLI would run it: -> (exit code, stderr). Its one_line_errors
    turns a UserError into one line and exit code 2 (checked in a real subprocess below); here we apply the same
    rule by hand, so that each case costs no interpreter start and library import (~2 s each)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["train_rid.py", *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    try:
        runpy.run_path(os.path.join(ROOT, "train_rid.py"), run_name="__main__")
        code = 0
    except SystemExit as e:  # argparse's errors: one_line_errors prints the line itself
        code = e.code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_train_bad_input_is_one_line_exit_2_and_writes_nothing(case, workdir, tiny_sd, monkeypatch, capsys):
    args, word = CASES[case]
    base = ["--model", tiny_sd, "--out", "run", *OK]
    before = listing(workdir)
    code, stderr = train_in_process([*base, *args], workdir, monkeypatch, capsys)  # later flags win, as in argparse
    lines = stderr.strip().splitlines()
    assert code == 2, (case, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert word in lines[0], lines[0]
    assert listing(workdir) == before  # no file appeared, none was touched


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown reward", "hub id offline", "hub id offline, no HF_HUB_OFFLINE",
                                  "removed hub repository", "reward weights offline"])
def test_train_bad_input_in_a_real_process(case, workdir, tiny_sd):
    """Cases as a user meets them: one line on stderr, exit code 2, no traceback, nothing written. Without
    HF_HUB_OFFLINE (a cluster's compute node) the hub libraries would retry five times, a warning line each, before
    failing; a hub that answers "repository not found" (a removed model) is named as such, not as being offline."""
    import http.server
    import threading
    env = {"HF_HUB_OFFLINE": "1"}
    if case == "hub id offline, no HF_HUB_OFFLINE":
        env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: nothing listens
        args, word = ["--model", "someone/not-downloaded"], "cannot be reached"
    elif case == "removed hub repository":  # a local stand-in for the hub, answering as the hub does for SD 2.1 now

        class Hub(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
            do_HEAD = do_GET

            def log_message(self, *a):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        args, word = ["--model", "stabilityai/stable-diffusion-2-1"], "has no repository"
    elif case == "reward weights offline":  # found after the model loaded: a real process keeps its bars quiet
        args, word = ["--rewards", "aesthetic"], "reward 'aesthetic'"
    else:
        args, word = CASES[case]
    before = listing(workdir)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_rid.py"), "--model", tiny_sd, "--out", "run", *OK,
                        *args], capture_output=True, text=True, cwd=workdir,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and word in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert listing(workdir) == before


@pytest.mark.slow
def test_an_earlier_run_is_never_clobbered_and_resume_checks_settings(workdir, tiny_sd, trained, monkeypatch, capsys):
    """A real (tiny) finished run; a plain rerun and a --resume are refused (it is finished); with its results.json
    gone (as if killed before the end), --resume with another learning rate and K is refused, naming both; with
    the base model's evaluated images gone, --resume is refused before any work."""
    import shutil
    from conftest import RUN
    shutil.copytree(trained("naive")[0], workdir / "run")
    flags = ["--model", tiny_sd, "--out", "run", "--method", "naive", *RUN]
    for extra, message in (([], "finished run"), (["--resume"], "finished run")):
        before = listing(workdir)
        code, stderr = train_in_process([*flags, *extra], workdir, monkeypatch, capsys)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert listing(workdir) == before
    os.remove(workdir / "run" / "results.json")
    before = listing(workdir)
    code, stderr = train_in_process([*flags, "--resume", "--lr", "0.5", "--grad_steps", "1"], workdir, monkeypatch, capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "lr=" in stderr and "grad_steps=" in stderr
    assert listing(workdir) == before
    (workdir / "run" / "samples" / "stage1.pt").write_bytes(b"not a tensor file")
    before = listing(workdir)
    code, stderr = train_in_process([*flags, "--resume"], workdir, monkeypatch, capsys)
    assert code == 2 and "stage1.pt' is damaged" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert listing(workdir) == before
    os.remove(workdir / "run" / "samples" / "stage0.pt")
    before = listing(workdir)
    code, stderr = train_in_process([*flags, "--resume"], workdir, monkeypatch, capsys)
    assert code == 2 and "stage0.pt' is gone" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert listing(workdir) == before


@pytest.mark.parametrize("script, args, word", [
    # SD 3: the VAE's downscale times the transformer's patch (16 px for SD 3.5; 2 x 2 = 4 on the tiny layout)
    ("train_rid.py", ["--height", "34"], "multiples of 4 px"),
    ("sample.py", ["--width", "30"], "try 28 or 32 for 30"),
    ("sample.py", ["--eta", "0.5"], "--eta 0.5"),  # the flow sampler is deterministic
])
def test_sd3_checks_come_before_any_weights_load(script, args, word, tiny_sd3, tmp_path, monkeypatch, capsys):
    """Refused from the model's config files alone: load_pipeline, which would read every weight first, fails this
    test if it is reached. One line, exit 2, nothing written."""
    import sample

    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the check")
    monkeypatch.setattr(sample, "load_pipeline", no_loading)
    before = listing(tmp_path)
    if script == "train_rid.py":
        code, stderr = train_in_process(["--model", tiny_sd3, "--out", "run", *OK, *args], tmp_path, monkeypatch, capsys)
    else:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["sample.py", "--model", tiny_sd3, "--prompt", "a cat", "--out", "o", *args])
        with pytest.raises(UserError) as e:
            sample.main()
        code, stderr = 2, f"error: {e.value}"
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and word in stderr, stderr
    assert listing(tmp_path) == before


def test_a_folder_another_process_trains_into_is_refused(workdir, tiny_sd, monkeypatch, capsys):
    """Two processes never train into one folder: a run's folder, or its baseline's (an orphaned baseline still
    saving when a quick --resume would start a second one), held by another process (flock, as train_rid.py holds
    its own) gets one line and nothing is written."""
    import fcntl
    for folder, args in ((workdir / "unfinished", ["--out", "unfinished", "--resume"]),
                         (workdir / "pair" / "baseline_naive", ["--out", "pair", "--baseline", "naive", "--resume"])):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the other process holds it
        try:
            before = listing(workdir)
            code, stderr = train_in_process(["--model", tiny_sd, *OK, *args], workdir, monkeypatch, capsys)
        finally:
            os.close(fd)
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert ("in use by another process" if "unfinished" in str(folder) else "still runs in") in stderr, stderr
        assert listing(workdir) == before


@pytest.mark.parametrize("args, warning", [
    (["--method", "naive", "--rid_lambda", "5"], "warning: --rid_lambda 5.0 changes nothing with --method naive"),
    (["--method", "rid", "--l2_weight", "0.5"], "warning: --l2_weight 0.5 changes nothing with --method rid"),
    (["--method", "l2", "--soup_weight", "2"], "warning: --soup_weight 2.0 changes nothing with --method l2"),
    (["--method", "adapters", "--ema_momentum", "0.9"], "warning: --ema_momentum 0.9 changes nothing"),
    (["--method", "naive", "--baseline", "naive"], "warning: --baseline naive is this run's own method"),
])
def test_flags_that_change_nothing_get_a_warning_line(args, warning, workdir, tiny_sd, monkeypatch, capsys):
    """Here the run then stops at its folder (a finished run), so the test costs no training."""
    code, stderr = train_in_process(["--model", tiny_sd, "--out", "finished", *OK, *args], workdir, monkeypatch, capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and lines[0].startswith(warning) and "finished run" in lines[1] and len(lines) == 2, stderr


def test_a_baseline_under_torchrun_is_one_line(workdir, tiny_sd, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, stderr = train_in_process(["--model", tiny_sd, "--out", "run", *OK, "--baseline", "naive"], workdir,
                                    monkeypatch, capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "one-process run only" in stderr, stderr


def test_out_of_gpu_memory_is_one_line_that_names_the_levers(tmp_path):
    """What a CUDA out-of-memory error becomes in every script (one_line_errors): one line naming the levers, exit 1."""
    script = tmp_path / "oom.py"
    script.write_text("import argparse, sys, torch\nsys.path.insert(0, sys.argv[1])\nfrom common import one_line_errors\n"
                      "one_line_errors(argparse.ArgumentParser())\n"
                      "raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n")
    r = subprocess.run([sys.executable, str(script), ROOT], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in lines[0] and "--grad_accum" in lines[0]


def test_under_torchrun_only_the_first_process_holds_the_run_folder(workdir, tiny_sd, monkeypatch, capsys):
    """The folder held (as rank 0 holds it), the second process of a torchrun --resume does not try to hold it too: it
    gets as far as the folder's own verdict (here: nothing to resume), not "in use by another process"."""
    import fcntl
    fd = os.open(workdir / "finished", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        code, stderr = train_in_process(["--model", tiny_sd, "--out", "finished", *OK, "--resume"], workdir,
                                        monkeypatch, capsys)
    finally:
        os.close(fd)
    assert code == 2 and "nothing to resume" in stderr and "in use" not in stderr, stderr


def test_a_filesystem_that_cannot_lock_a_folder_gets_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """NFS (flock emulated with byte-range locks, which a read-only descriptor cannot take) and Lustre without
    -o flock refuse the lock with an error that is not "held": a warning line, not a traceback and not a refusal."""
    import errno
    import fcntl
    import common

    def refuse(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")
    monkeypatch.setattr(fcntl, "flock", refuse)
    common.hold_folder(str(tmp_path))
    assert "cannot lock" in capsys.readouterr().err and not common.folder_in_use(str(tmp_path))
