"""
baseline.py: the baseline that train_rid.py trains beside a run (--baseline METHOD; the toy quick start's default is
naive). The same script with the same flags and --method METHOD trains in a second process into OUT/baseline_METHOD,
starting once the run has evaluated the base model, whose images and scores it takes over (the same model, prompts
and noise). At the end the run prints both tables and draws both grids side by side in OUT/compare.png.

The protocol between the two processes:
  - the baseline runs in its own session, so Ctrl-C in a terminal reaches only the run, which passes it on; both save
    a checkpoint, and `--resume` continues both (or the baseline alone, when the run had finished);
  - the baseline stops as on Ctrl-C when the run's process is gone (RID_PARENT_PID);
  - each process uses half the cores: on small models two one-thread processes do more work than one two-thread
    process (docs/speed_and_memory.md); the run uses half as well from its start, so its numbers do not depend on
    whether the baseline is running yet.
train_rid.py is the only user:
    side = Baseline(script, argv, "naive", out, steps); side.start(); side.poll() each step; side.finish(...)
"""
import os
import shutil
import subprocess
import sys
import time

from tqdm.auto import tqdm

from common import load_file

THREADS = max(1, (os.cpu_count() or 1) // 2)  # torch threads of each of the two processes
# Set in the baseline's process by the run that started it: that run's folder (whose stage 0 we take) and its pid.
RUN_FOLDER, PARENT_PID = os.environ.get("RID_RUN_FOLDER"), int(os.environ.get("RID_PARENT_PID", 0))


def finished(folder):
    return os.path.isfile(os.path.join(folder, "results.json"))


def parent_gone():
    """In the baseline's process: the run it trains beside has ended (killed, or died). -> stop as on Ctrl-C."""
    return PARENT_PID > 0 and os.getppid() != PARENT_PID


def adopt_stage0(out, master):
    """In the baseline's process: stage 0 (the base model's evaluation) of the run it trains beside, copied into our
    folder, which then holds all that eval.py --run and --resume read. -> that stage's record."""
    stage0 = load_file(os.path.join(RUN_FOLDER, "checkpoint.pt"))["stages"][0]
    if master:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        shutil.copyfile(os.path.join(RUN_FOLDER, "samples", "stage0.pt"), os.path.join(out, "samples", "stage0.pt"))
        shutil.copytree(os.path.join(RUN_FOLDER, "samples", "stage0"), os.path.join(out, "samples", "stage0"))
    return {**stage0, "seconds": 0.0}  # evaluated by the other run


class Baseline:
    """The baseline's process, beside the run in `run_folder`: started (start()) from the run's own command line
    (`argv`) with the method, folder and --baseline none replaced; it resumes its own checkpoint when there is one.
    Its output goes to FOLDER.log and its progress is a second bar here, read from its log.jsonl."""

    def __init__(self, script, argv, method, run_folder, steps):
        self.script, self.argv, self.method, self.run_folder, self.steps = script, argv, method, run_folder, steps
        self.folder, self.proc = os.path.join(run_folder, f"baseline_{method}"), None

    def start(self):
        flags = [a for a in self.argv if a not in ("--resume", "--overwrite")]
        flags += ["--method", self.method, "--out", self.folder, "--baseline", "none"]
        if os.path.isfile(os.path.join(self.folder, "checkpoint.pt")):
            flags.append("--resume")
        elif os.path.isdir(self.folder):  # stopped before its first checkpoint: nothing trained to keep
            flags.append("--overwrite")
        print(f"baseline: {self.method} with the same settings, beside this run in {self.folder} "
              f"(its output: {self.folder}.log)")
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "RID_PARENT_PID": str(os.getpid()),
               "RID_RUN_FOLDER": os.path.abspath(self.run_folder)}
        os.makedirs(self.run_folder, exist_ok=True)
        with open(f"{self.folder}.log", "a") as log:
            self.proc = subprocess.Popen([sys.executable, self.script, *flags], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.bar = tqdm(total=self.steps, desc=f"beside: {os.path.basename(self.folder)}", position=1,
                        dynamic_ncols=True)

    def poll(self):
        """Move the bar to the baseline's finished steps. -> its exit code, or None while it runs."""
        if self.proc is None:
            return 0  # not started (it had finished before)
        log = os.path.join(self.folder, "log.jsonl")
        steps = sum(1 for _ in open(log)) if os.path.isfile(log) else 0
        self.bar.update(steps - self.bar.n)
        return self.proc.poll()

    def signal(self, signum):  # Ctrl-C or SIGTERM, passed on
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self):
        """Until the baseline ends, its bar moving. -> its exit code (130: stopped by a signal, checkpoint saved)."""
        if self.proc is None:
            return 0
        while self.poll() is None:
            time.sleep(0.5)
        self.bar.close()
        return self.proc.returncode

    def finish(self, table, stopped, again, this_method):
        """Wait for the baseline, then print the run's table, the baseline's, and draw both grids side by side in
        RUN/compare.png. again: the command that continues both. -> the exit code (130: stopped, both resumable;
        1: the baseline failed)."""
        from report import side_by_side
        code = self.wait()
        print(table, end="")
        if code == 130 or stopped:
            print(f"interrupted: the baseline saved its checkpoint; continue both with: {again}")
            return 130
        if not finished(self.folder):
            print(f"the baseline failed; its own error is at the end of {self.folder}.log")
            return 1
        print(f"\nbaseline: {self.method} with the same settings, into {self.folder}")
        print(open(os.path.join(self.folder, "results.md")).read(), end="")
        side_by_side([os.path.join(self.folder, "grid.png"), os.path.join(self.run_folder, "grid.png")],
                     [f"{self.method} (baseline)", f"{this_method} (this run)"],
                     os.path.join(self.run_folder, "compare.png"))
        print(f"wrote {self.run_folder}/compare.png: {self.method} (left) and {this_method} (right), the same prompts "
              f"and noise")
        return 0
