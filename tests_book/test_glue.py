"""Every measured number in the chapters' prose comes from the run that measured it.

A number in a chapter's markdown that looks measured (a percentage, a ratio such as "1.7×", a time, a
bandwidth, a rate, "points" of accuracy) must either be a value glued from the cell that computed it
(myst-nb's ``{glue:text}`key:fmt` `` role, rendered from the stored outputs), or stand in a sentence
that cites its source (``{cite}`key` ``): a number from a paper. Anything else is a number typed by
hand, which nothing re-checks when the chapter is executed again, and fails this test.

The test reads the notebooks only (no build needed). It also checks that every glued key used in a
chapter's markdown is defined by a ``glue`` output stored in the same notebook.
"""

from __future__ import annotations

import ast
import json
import re

import pytest
from bookconfig import CHAPTERS

# A number (1, 1.5, 12,345, .5) followed by a unit that marks it as a measurement.
_UNIT = (r"(?:%|\\%|per\s?cent\b|percent\b|×(?!\s*\d)|x(?![\w\d])|ms\b|µs\b|us\b|s\b|sec\b|seconds?\b|minutes?\b|"
         r"min\b|hours?\b|points?\b|pp\b|GB/s|MB/s|TFLOP/s|GFLOP/s|steps/s|it/s|images/s|samples/s)")
_MEASURED = re.compile(r"(?<![\w.\-])(\d[\d,]*(?:\.\d+)?|\.\d+)\s?" + _UNIT)
_GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`[^`]*`")
_GLUE_KEY = re.compile(r"\{glue(?::\w+)?\}`([^`:]+)")
_CITE = re.compile(r"\{cite(?::\w+)?\}`")
_FENCE = re.compile(r"^(```|~~~|:::).*?^\1", re.M | re.S)
_INLINE_CODE = re.compile(r"(?<!\})`[^`]*`")
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# Sentence ends: a full stop, question or exclamation mark before a space and an upper-case letter or
# a line break; a blank line; a table row.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[*_])|\n\s*\n|\n(?=\s*[|*\-+] )|\n(?=\s*\d+\. )")


def _prose(markdown: str) -> str:
    """Returns the markdown with code, comments and link targets blanked out (math is kept)."""
    text = _HTML_COMMENT.sub(" ", markdown)
    text = _FENCE.sub(lambda m: _keep_admonitions(m.group(0)), text)
    text = _LINK_TARGET.sub("]", text)
    return text


def _keep_admonitions(block: str) -> str:
    """Code fences go; MyST directives that hold prose (admonitions, dropdowns, notes) are kept."""
    first = block.split("\n", 1)[0]
    if re.match(r"^(```|~~~|:::)\s*\{(admonition|note|tip|warning|important|caution|attention|hint|seealso|"
                r"dropdown|margin|sidebar|topic|epigraph|div)\}", first):
        return block.split("\n", 1)[1] if "\n" in block else ""
    return " "


def typed_numbers(markdown: str) -> list[str]:
    """The measured-looking numbers of ``markdown`` that are neither glued nor in a cited sentence.

    Returns:
        list of the offending sentences' matches, as ``"<number+unit>  in: <sentence>"`` strings.
    """
    hits = []
    for sentence in _SENTENCE_END.split(_prose(markdown)):
        if _CITE.search(sentence):
            continue
        bare = _GLUE_ROLE.sub(" ", sentence)
        bare = _INLINE_CODE.sub(" ", bare)
        for m in _MEASURED.finditer(bare):
            hits.append(f"{m.group(0)!r}  in: {' '.join(sentence.split())[:160]}")
    return hits


def _chapters():
    return sorted(CHAPTERS.glob("*.ipynb"))


def _markdown_cells(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            yield i, "".join(cell["source"])


def _glued_values(path) -> dict[str, str]:
    """``{key: stored text/plain}`` of every glue output of the notebook."""
    nb = json.loads(path.read_text())
    values = {}
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            scrap = (out.get("metadata") or {}).get("scrapbook") or {}
            if "name" in scrap:
                data = out.get("data") or {}
                text = next((v for k, v in data.items() if k.endswith("text/plain")), "")
                values[scrap["name"]] = "".join(text) if isinstance(text, list) else text
    return values


def _glued_keys(path) -> set[str]:
    return set(_glued_values(path))


_GLUE_USE = re.compile(r"\{glue(?::\w+)?\}`([^`]+)`")


@pytest.mark.parametrize("path", _chapters(), ids=lambda p: p.stem)
def test_no_typed_measurements(path):
    problems = [f"cell {i}: {hit}" for i, md in _markdown_cells(path) for hit in typed_numbers(md)]
    assert not problems, (
        f"{path.name}: measured-looking numbers typed by hand (glue them from the cell that computes them, "
        "or cite the paper they come from in the same sentence):\n  " + "\n  ".join(problems))


@pytest.mark.parametrize("path", _chapters(), ids=lambda p: p.stem)
def test_glued_keys_exist(path):
    defined = _glued_keys(path)
    used = {(i, k.strip()) for i, md in _markdown_cells(path) for k in _GLUE_KEY.findall(md)}
    missing = sorted(f"cell {i}: {k}" for i, k in used if k not in defined)
    assert not missing, (f"{path.name}: glue keys used in markdown but not stored by any cell:\n  "
                         + "\n  ".join(missing))


def test_chapters_exist():
    assert _chapters(), f"no chapters in {CHAPTERS}"


# The checker itself, on planted text: it must catch a typed number and let glued and cited ones pass.
@pytest.mark.parametrize("text", [
    "With BN the network reaches 98.2 % test accuracy.",
    "Folding makes inference 1.7× faster.",
    "The run took 302 s on this machine.",
    "BN is 3.1 points ahead.",
    "Training ran at 640 steps/s.",
    "It is 2x faster than before.",
    "The copy reaches 11 GB/s.",
    "| BN | 97.5% |",
    "After that, 0.5 points separate them {glue:text}`a:.1f`.",
])
def test_checker_catches_typed_numbers(text):
    assert typed_numbers(text), text


@pytest.mark.parametrize("text", [
    "With BN the network reaches {glue:text}`bn_acc:.1f` % test accuracy.",
    "Ioffe and Szegedy report 14 times fewer steps and 4.9 % top-5 error {cite}`ioffe2015batch`.",
    "Images are 28×28 pixels, the network is 784-100-100-100-10, batch 60, lr 0.1, 3 seeds.",
    "```python\nprint(f'{acc:.1f} %')  # 98.2 %\n```",
    "The code `x.mean(0)  # 5 s` is not prose.",
    "We use $\\epsilon = 10^{-5}$ and layer 3 of 4.",
])
def test_checker_lets_glued_cited_and_plain_numbers_pass(text):
    assert not typed_numbers(text), typed_numbers(text)


@pytest.mark.parametrize("path", _chapters(), ids=lambda p: p.stem)
def test_glued_numbers_can_be_formatted(path):
    """A glued value used with a number format (``key:.1f``) must be stored as a plain number: a NumPy or torch
    scalar is stored as ``np.float64(…)``, which myst-nb cannot format, and the strict build fails."""
    values = _glued_values(path)
    bad = []
    for i, md in _markdown_cells(path):
        for use in _GLUE_USE.findall(md):
            key, _, spec = use.partition(":")
            if spec and spec[-1] in "bcdoxXeEfFgGn%" and key.strip() in values:
                try:
                    float(ast.literal_eval(values[key.strip()]))
                except (ValueError, SyntaxError, TypeError):
                    bad.append(f"cell {i}: {key.strip()} = {values[key.strip()]!r:.60}")
    assert not bad, (f"{path.name}: glue plain Python numbers (float(x), int(x)); these cannot be formatted:\n  "
                     + "\n  ".join(bad))
