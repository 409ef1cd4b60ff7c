"""The documentation: README.md and docs/*.md.

- Every relative link (and image) leads to a file of the checkout (``#anchors`` stripped; http(s) and mailto
  links are not followed).
- Every ```python block runs, in a fresh namespace, in an empty working directory, offline.  A block that
  cannot run here (it needs a trained run, or loads the teacher) is preceded by the line
  ``<!-- not run: REASON -->``; the reason must be given.
- The README's set-up section holds exactly the two commands that CI runs.
"""

import linecache
import re
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,})(?P<info>[^`]*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run\b(?P<rest>.*?)-->\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?(?P<target>[^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).*?\1")
SET_UP_COMMANDS = [
    "pip install torch==2.13.0 setuptools wheel ninja && pip install --no-build-isolation -e . "
    "&& python -m cubecore.train",
    "pip install pytest pytest-benchmark && pytest",
]


class Block(NamedTuple):
    path: Path
    index: int  # the index among the file's python blocks
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str  # the line before the fence


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fenced_blocks(path: Path) -> List[Block]:
    """Every fenced code block of a Markdown file, dedented by its fence's indent (blocks inside lists)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i, n_python = [], 0, 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, lang = m["indent"], m["ticks"], m["info"].strip().split(" ")[0].lower()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{ticks}`*\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        assert j < len(lines), f"{rel(path)}:{i + 1}: code fence never closed"
        marker = lines[i - 1] if i > 0 else ""
        blocks.append(Block(path, n_python if lang == "python" else -1, i + 1, lang, "\n".join(body) + "\n", marker))
        n_python += lang == "python"
        i = j + 1
    return blocks


def prose(path: Path):
    """(line number, text) of the file's lines outside fenced blocks, inline code removed (code may hold
    `x[i](y)`)."""
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m["ticks"]
        elif fence is not None:
            if re.match(rf"^\s*{fence}`*\s*$", line):
                fence = None
        else:
            yield number, CODE_SPAN.sub("", line)


def links(path: Path):
    for number, line in prose(path):
        for m in LINK.finditer(line):
            yield number, m["target"]


def python_blocks() -> List[Block]:
    return [b for path in DOCS for b in fenced_blocks(path) if b.lang == "python"]


def test_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert len(DOCS) > 1, "no docs/*.md"


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_relative_links_resolve(path):
    broken = []
    for line, target in links(path):
        if re.match(r"^(https?:|mailto:)", target, re.I) or target.startswith("#"):
            continue
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I), f"{rel(path)}: unexpected link scheme {target}"
        file = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / file).resolve().exists():
            broken.append(f"line {line}: {target}")
    assert not broken, f"{rel(path)}: links to missing files: {broken}"


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_not_run_markers_give_a_reason(path):
    for block in fenced_blocks(path):
        m = NOT_RUN.match(block.marker)
        if m:
            reason = m["rest"].strip()
            assert reason.startswith(":") and reason[1:].strip(), \
                f"{rel(path)}:{block.line - 1}: write <!-- not run: REASON --> with a reason"
    # A marker that does not sit right before a python fence skips nothing: say so rather than ignore it.
    lines = path.read_text(encoding="utf-8").splitlines()
    for k, line in enumerate(lines):
        if NOT_RUN.match(line):
            nxt = FENCE.match(lines[k + 1]) if k + 1 < len(lines) else None
            assert nxt and nxt["info"].strip().lower().startswith("python"), \
                f"{rel(path)}:{k + 1}: a not-run marker must be the line right before a ```python fence"


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: f"{rel(b.path)}-block{b.index}-line{b.line}")
def test_python_block_runs(block, tmp_path, monkeypatch):
    m = NOT_RUN.match(block.marker)
    if m:
        reason = m["rest"].strip().lstrip(":").strip()
        assert reason, f"{rel(block.path)}:{block.line - 1}: not-run marker without a reason"
        pytest.skip(f"not run: {reason}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("CUBECORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # A name of its own, known to linecache, so that a traceback shows the block and names its fence's line.
    name = f"<{rel(block.path)}, python block {block.index} at line {block.line}>"
    linecache.cache[name] = (len(block.code), None, block.code.splitlines(True), name)
    exec(compile(block.code, name, "exec"), {"__name__": "__docs__"})


def test_readme_set_up_commands():
    """The set-up section holds exactly the two commands CI runs, character for character."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Set up\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Set up' section"
    commands = [b.code.strip() for b in fenced_blocks(ROOT / "README.md")
                if b.lang == "bash" and b.code.strip() and m.start() <= _offset(text, b.line) < m.end()]
    assert commands == SET_UP_COMMANDS
    ci = ROOT / ".ci" / "run"
    if ci.is_file():
        ci_lines = [line.strip() for line in ci.read_text(encoding="utf-8").splitlines()]
        for command in SET_UP_COMMANDS:
            assert command in ci_lines, f"CI no longer runs the README's command: {command}"


def _offset(text: str, line: int) -> int:
    """The character offset of a 1-based line."""
    return sum(len(x) + 1 for x in text.split("\n")[:line - 1])
