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
