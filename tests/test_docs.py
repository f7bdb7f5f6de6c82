"""The README and docs/: every relative link points at a file that exists and, with an #anchor, at a heading there
(GitHub's anchors: lower case, punctuation dropped, spaces as hyphens); and speed is named one way."""
from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_anchor_rule():
    assert "the-quality-guard-cost-and-benefit-on-the-proxy" in {
        re.sub(r"[^\w\- ]", "", "The quality guard: cost and benefit on the proxy".lower()).replace(" ", "-")}


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(linked):
            broken.append(f"{target}: no file {os.path.relpath(linked, ROOT)}")
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(linked, ROOT)}")
    assert not broken, broken


def test_the_readme_reads_in_ten_minutes_and_leads_with_the_comfyui_user():
    with open(DOCUMENTS[0], encoding="utf-8") as f:
        text = f.read()
    assert len(text.split()) <= 2600  # about ten minutes at 250 words a minute
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[0] == "Install" and headings.index("The node's options") < 3, headings


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_speed_is_named_one_way(path):
    """speedup = torch SDPA (exact) time / backend time everywhere; the inverse column bench once printed
    ("x torch SDPA") is only named where the conversion is explained."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for paragraph in text.split("\n\n"):
        if "x torch SDPA" in paragraph:
            assert "inverse" in paragraph and "converted" in paragraph, paragraph
    assert not re.search(r"\bthe time of torch SDPA\b", text)
