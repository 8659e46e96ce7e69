"""The README and docs/: every relative link and image resolves (a heading for a #fragment), the README stays short,
and CI runs exactly the README's test command."""
import os
import re

import pytest

from conftest import ROOT

PAGES = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                         if f.endswith(".md")]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = open(path).read()
    heads = re.findall(r"^#+\s+(.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_and_images_resolve(page):
    path = os.path.join(ROOT, page)
    links = LINK.findall(open(path).read())
    assert links or page != "README.md"
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith("mailto:"):
            continue
        target, _, fragment = link.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        assert os.path.exists(file), f"{page}: {link} -> {file} does not exist"
        if fragment:
            assert fragment in anchors(file), f"{page}: no heading for #{fragment} in {file}"


def test_readme_is_short_and_ci_runs_its_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert readme.count("\n") <= 260
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "python -m pytest" in readme and ci.strip().splitlines()[-1] == "python -m pytest"


@pytest.mark.slow
def test_the_method_copies_out_in_two_files_and_the_page_shows_what_it_prints(tmp_path):
    """docs/method.md's snippet, run as a researcher runs it in their own project: sample.py and losses.py copied
    alone into an empty folder (beside them only a model folder, here the toy model), nothing else of rid's
    importable, a stock diffusers pipeline in, a reward of two lines. Twice: the same lines both times (the adapter
    is seeded), and the very lines the page shows under it. The teacher loss is exactly 0 at the first step (B = 0:
    the teacher is the student) and above 0 after it."""
    import shutil
    import subprocess
    import sys
    text = open(os.path.join(ROOT, "docs", "method.md")).read()
    code, shown = re.search(r"```python\n(.*?)```\n.*?```text\n(.*?)```", text, re.S).groups()
    for name in ("sample.py", "losses.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    os.symlink(os.path.join(ROOT, "toy_model"), tmp_path / "toy_model")
    (tmp_path / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = [subprocess.run([sys.executable, "snippet.py"], capture_output=True, text=True, cwd=tmp_path, env=env)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:]
    assert runs[0].stdout == runs[1].stdout == shown
    assert sorted(set(os.listdir(tmp_path)) - {"__pycache__"}) == ["losses.py", "sample.py", "snippet.py", "toy_model"]
    loss = [float(line.rsplit(" ", 1)[1]) for line in shown.splitlines()]
    assert loss[0] == 0 and all(v > 0 for v in loss[1:])


def test_the_method_picture_is_what_report_draws():
    """assets/method.png (docs/method.md's picture) is report.draw_method()'s: the same size, and the same pixels up
    to font rendering (Pillow versions rasterise text a little differently)."""
    import numpy as np
    from PIL import Image
    import report
    shipped = np.asarray(Image.open(os.path.join(ROOT, "assets", "method.png")).convert("RGB")).astype(int)
    drawn = np.asarray(report.draw_method()).astype(int)
    assert shipped.shape == drawn.shape
    assert (np.abs(shipped - drawn).max(-1) > 64).mean() < 0.01
