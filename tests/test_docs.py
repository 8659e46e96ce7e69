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


def test_the_method_page_snippet_runs_as_written(capsys, monkeypatch):
    """docs/method.md's first Python block, pasted as a reader would (from the repository root): it trains two RID
    steps on the toy model; the teacher loss is exactly 0 at the first step (B = 0: the teacher is the student) and
    above 0 at the second, and the reward is a number in [0, 1]."""
    text = open(os.path.join(ROOT, "docs", "method.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(ROOT)
    exec(compile(code, "docs/method.md", "exec"), {"__name__": "__main__"})
    lines = capsys.readouterr().out.strip().splitlines()
    found = [re.fullmatch(r"step (\d): reward ([\d.]+), teacher loss ([\d.e+-]+)", line) for line in lines]
    assert len(found) == 2 and all(found), lines
    assert float(found[0].group(3)) == 0 and float(found[1].group(3)) > 0
    assert all(0 < float(m.group(2)) < 1 for m in found)
