"""
common.py: the plumbing every rid script shares, none of the method. One error mechanism (a UserError anywhere ends
the program with one line and exit code 2; the class itself lives in sample.py, so that the sampler copies out alone),
writes that a kill cannot leave half done, run folders that one process at a time trains into, the seed streams, the
one place that picks device and dtype, the experiment trackers, and 8-bit images (PNG files and grids). The hub check
and its error lines are the loader's, in sample.py.

    from common import UserError, one_line_errors, atomic_file, atomic_dir, write_json, seed_for, pick_device_dtype
"""
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys

import torch

from sample import UserError  # defined beside the sampler, which then copies out alone

# -----------------------------------------------------------------------------
# Errors: bad input gets one line and exit code 2, from any depth of any script


def one_line_errors(parser):
    """CLI setup, called by every script on its parser: a bad flag, or a UserError raised anywhere (in a flat script's
    top-level code or inside a library call), ends the program with one line on stderr and exit code 2, no traceback.
    Library deprecation chatter and weight-loading bars are silenced so that such errors stay one line."""
    import warnings
    warnings.filterwarnings("ignore", module="(huggingface_hub|diffusers|transformers|peft)")
    # Environment, not the libraries' setters: importing diffusers costs seconds we need not spend on bad input.
    for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the weight-loading bars of both libraries

    def error(message):
        print(f"error: {message} (see {parser.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def excepthook(kind, value, tb):
        if issubclass(kind, UserError):
            print(f"error: {value}", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(2)
        if issubclass(kind, torch.cuda.OutOfMemoryError):  # a step that does not fit: the levers, in the same one line
            print(f"error: out of GPU memory ({str(value).strip().splitlines()[0][:90]}); lower a step's peak with "
                  f"--grad_accum N (the same results in N passes), --checkpoint_decode or --cache_prompts "
                  f"(docs/speed_and_memory.md); a stopped run continues from its last checkpoint with --resume",
                  file=sys.stderr)
            sys.stderr.flush()
            sys.exit(1)
        sys.__excepthook__(kind, value, tb)
    parser.error, sys.excepthook = error, excepthook
    return parser

# -----------------------------------------------------------------------------
# Seeds: every random draw has its own seed, a function of its stream and its ids

SEED_STREAMS = ("eval", "train", "eta", "lora")
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


def check_seed(flag, seed):
    """A seed flag's value: any integer in [0, 2^64 - 1]; anything else gets one line."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{flag} must be an integer from 0 to 2^64 - 1 (got {seed})")
    return seed


def seed_for(stream, *ids):
    """The seed of one random draw, from its stream name and its ids (non-negative ints such as seed, task, step,
    image): a hash, so any user seed works and the same (stream, ids) always gives the same draw.
    torch's CPU generator (mt19937) uses only the low 32 bits of a seed (seeds s and s + 2^32 draw alike), so the
    seed is a 32-bit number: 30 bits of a BLAKE2b hash of (stream, ids) above 2 bits that hold the stream's index.
    Two streams therefore never share a seed, by construction: evaluation noise can never repeat a training draw,
    whatever the seeds. Within one stream two id tuples share a seed with chance about n^2 / 2^31 over n draws, which
    only repeats one batch's prompts and noise (our choice)."""
    assert all(isinstance(i, int) and i >= 0 for i in ids), f"seed ids must be non-negative ints, got {ids}"
    digest = hashlib.blake2b(repr((stream, *ids)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 2 << 2 | SEED_STREAMS.index(stream)

# -----------------------------------------------------------------------------
# Device and dtype

def pick_device_dtype(device=None, dtype=None):
    """One place that decides precision: bf16 compute on a CUDA GPU that supports it, else fp16 there (trained with
    a loss scaler); fp32 on CPU; unless the user says otherwise."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None and device.startswith("cuda"):
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, getattr(torch, dtype or "float32")


# -----------------------------------------------------------------------------
# Experiment trackers: scalars and pictures to TensorBoard or Weights & Biases, beside the run's own log.jsonl

class Tracker:
    """An experiment tracker (train_rid.py --log): "tensorboard" writes OUT/tensorboard/, "wandb" a run in project
    rid (WANDB_MODE=offline: OUT/wandb/, no server), "none" nothing. The package is imported only when asked for.
    run_id: the wandb run to continue on --resume. first_step: on --resume, the first step the run logs again; a
    killed run may have logged steps after its checkpoint, which the resumed run logs again, bit for bit the same:
    TensorBoard purges its earlier events from that step on (SummaryWriter's purge_step), and wandb keeps the first
    value of a step and drops a repeat."""

    def __init__(self, kind, out, config, run_id=None, first_step=None):
        self.kind, self.id = kind, run_id
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=first_step)
        elif kind == "wandb":
            import wandb
            self.wandb = wandb
            self.run = wandb.init(project="rid", dir=out, name=os.path.basename(os.path.abspath(out)), config=config,
                                  id=run_id, resume="allow")
            self.id = self.run.id

    def scalars(self, values, step):
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        elif self.kind == "wandb":
            self.wandb.log(values, step=step)

    def image(self, name, image, step):  # a PIL image
        if self.kind == "tensorboard":
            import numpy as np
            self.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif self.kind == "wandb":
            self.wandb.log({name: self.wandb.Image(image)}, step=step)

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.run.finish()

# -----------------------------------------------------------------------------
# Files: every write goes to a temporary name first and is renamed into place, so a kill at any moment
# leaves either the old file or the new one, never half of one.

@contextlib.contextmanager
def atomic_file(path):
    """with atomic_file(p) as tmp: write tmp; on success tmp replaces p in one rename (os.replace)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """with atomic_dir(d) as tmp: fill folder tmp; on success it becomes d (an old d is swapped out, then removed)."""
    path = path.rstrip("/")
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def remove_partial_writes(*folders):
    """What writes that a kill interrupted left in these folders (names ending .tmpPID or .oldPID), removed."""
    for folder in folders:
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            if re.search(r"\.(tmp|old)\d+$", name):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def load_file(path, check=lambda data: True):
    """A tensor file rid wrote, read back with torch.load (tensors and plain data only). A missing or damaged file,
    or one whose content fails `check`, gets one line, and the file stays as it is."""
    if not os.path.isfile(path):
        raise UserError(f"cannot resume: '{path}' is gone; start again with --overwrite")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        assert check(data)
        return data
    except Exception as e:
        raise UserError(f"cannot resume: '{path}' is damaged ({type(e).__name__}); restore it, or start again with "
                        f"--overwrite (which deletes the run)") from None


HELD = {}  # run folders this process holds: (device, inode) -> open descriptor, flock'ed until the process ends


def try_lock(fd):
    """An exclusive flock on an open folder, without waiting. -> True (ours), False (another process holds it), or
    None where the filesystem cannot lock a folder (NFS emulates flock with byte-range locks, which a read-only
    descriptor cannot take; Lustre without -o flock refuses): then nothing is locked, and the caller says so."""
    import errno
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        return False if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None


def hold_folder(folder):
    """Mark a run folder as in use by this process: an exclusive flock on the folder itself, which the OS drops when
    the process ends, killed or not. Two processes can then never train into one folder (a baseline still stopping
    and the one a quick --resume starts, or two runs given the same --out). One line if another process holds it; a
    warning line where the filesystem cannot lock (try_lock), and the run goes on unguarded."""
    fd = os.open(folder, os.O_RDONLY)
    key = os.fstat(fd).st_dev, os.fstat(fd).st_ino
    if key in HELD:  # held already (a second open file would conflict with our own lock)
        os.close(fd)
        return
    locked = try_lock(fd)
    if locked is False:
        os.close(fd)
        raise UserError(f"run folder '{folder}' is in use by another process (a run, or a baseline beside one, still "
                        f"training or saving); wait until it ends, or choose another --out")
    if locked is None:
        print(f"warning: this filesystem cannot lock '{folder}'; make sure no other process trains into it",
              file=sys.stderr)
    HELD[key] = fd


def folder_in_use(folder):
    """Whether another process holds `folder` (hold_folder); this process does not keep it."""
    import fcntl
    if not os.path.isdir(folder):
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        locked = try_lock(fd)
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return locked is False
    finally:
        os.close(fd)


def open_run_folder(out, resume, overwrite, hold=True):
    """A run folder before anything is loaded or written: an earlier run in it is refused unless --overwrite, and
    --resume needs an unfinished one; hold: this process holds it from now on (hold_folder; under torchrun only the
    first process, which writes its files, takes it). -> its checkpoint (dict) on --resume, else None."""
    ckpt_path, finished = os.path.join(out, "checkpoint.pt"), os.path.isfile(os.path.join(out, "results.json"))
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    if os.path.isdir(out) and hold:
        hold_folder(out)  # from here to the end of this process: nobody else trains into it
    if resume:
        if not os.path.isfile(ckpt_path):
            raise UserError(f"nothing to resume: no checkpoint.pt in '{out}'; drop --resume to start a new run")
        if finished:
            raise UserError(f"nothing to resume: '{out}' holds a finished run (results.json); choose another --out")
        return load_file(ckpt_path, lambda c: isinstance(c["config"], dict) and {"task", "step", "stages"} <= set(c))
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        what = ("a finished run" if finished else
                "an unfinished run (pass --resume to continue it)" if os.path.isfile(ckpt_path) else "files")
        raise UserError(f"run folder '{out}' already holds {what}; choose another --out or pass --overwrite")
    return None


def write_text(path, text):
    with atomic_file(path) as tmp, open(tmp, "w") as f:  # closed, then renamed
        f.write(text)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=1) + "\n")


def save_png(image, path):
    """A PIL image to a PNG file, atomically."""
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")

# -----------------------------------------------------------------------------
# 8-bit images: what a PNG holds, what the structure measures compare, what a run keeps of each stage

def to_uint8(images):
    """Float images in [0, 1] -> uint8, rounded as diffusers' numpy_to_pil does."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil(image):
    """(3, H, W) in [0, 1] -> PIL image."""
    from PIL import Image
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy())


def image_grid(images, ncol=None, pad=2):
    """(N, 3, H, W) in [0, 1] -> one PIL image, ncol images per row, white padding."""
    n, _, h, w = images.shape
    ncol = ncol or min(n, 8)
    nrow = math.ceil(n / ncol)
    grid = torch.ones(3, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for k in range(n):
        r, c = divmod(k, ncol)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[k]
    return to_pil(grid)
