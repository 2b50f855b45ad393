"""The user documents hold: links between them resolve, the commands they name exist, and every Python snippet in
README.md and docs/*.md runs. A snippet marked on the line before it with `<!-- not run: why -->` (it needs a GPU or
a running job server) only compiles; one marked `<!-- slow: why -->` (it starts worker processes of its own, tens of
seconds on a small machine) runs when RAYTRAINER_DOCS_SLOW=1, and only compiles otherwise."""

import os
import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])
MARKER = re.compile(r"<!--\s*(not run|slow):\s*(.+?)\s*-->")
RUN_SLOW = os.environ.get("RAYTRAINER_DOCS_SLOW") == "1"
FENCE = re.compile(r"^(?P<indent> *)```(?P<language>[\w-]*)\n(?P<code>.*?)^(?P=indent)```$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(path: Path, language: str) -> list[tuple[str, str, tuple[str, str] | None]]:
    """(name, code, (marker, reason) or None) of each fenced block of `language` in `path`."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match["language"] != language:
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip().rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        code = "\n".join(row[len(match["indent"]):] for row in match["code"].splitlines())
        blocks.append((f"{path.relative_to(ROOT)}:{line}", code, (marker[1], marker[2]) if marker else None))
    return blocks


PYTHON_BLOCKS = [block for path in DOCUMENTS for block in code_blocks(path, "python")]
RUNNABLE = [pytest.param(code, id=name, marks=[pytest.mark.skipif(not RUN_SLOW, reason=f"slow: {marker[1]} "
                                                                  "(RAYTRAINER_DOCS_SLOW=1 runs it)")] if marker else [])
            for name, code, marker in PYTHON_BLOCKS if marker is None or marker[0] == "slow"]


def test_documents_exist_and_have_snippets():
    names = {path.relative_to(ROOT).as_posix() for path in DOCUMENTS}
    assert {"README.md", "bench/README.md", "docs/architecture.md", "docs/compatibility.md"} <= names
    assert len(RUNNABLE) >= 8, [name for name, _, _ in PYTHON_BLOCKS]


@pytest.mark.parametrize("name,code", [(name, code) for name, code, _ in PYTHON_BLOCKS],
                         ids=[name for name, _, _ in PYTHON_BLOCKS])
def test_python_snippet_compiles(name, code):
    compile(code, name, "exec")


@pytest.fixture(scope="module")
def finished_snippets():
    """The globals of the snippets run so far. Kept until the module ends, so that their Trainers are not garbage
    collected (which releases their workers): the next snippet's Trainer takes over an idle group instead."""
    kept = []
    yield kept
    kept.clear()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("code", RUNNABLE)
def test_python_snippet_runs(code, ray_session, finished_snippets, tmp_path, monkeypatch):
    """Each snippet runs as a user's script would (`python snippet.py`, in an empty folder), on the session's Ray:
    its classes and functions travel to the workers by value."""
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "snippet.py"
    script.write_text(code)
    finished_snippets.append(runpy.run_path(str(script), run_name="__main__"))


def _headings(path: Path) -> set[str]:
    """GitHub's anchors of the Markdown headings in `path`."""
    anchors = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.relative_to(ROOT)}: link to {target} does not resolve"
        assert resolved.is_relative_to(ROOT), f"{path.relative_to(ROOT)}: {target} points outside the repository"
        if anchor:
            assert anchor in _headings(resolved), f"{path.relative_to(ROOT)}: no heading #{anchor} in {file}"


def _commands(path: Path) -> list[list[str]]:
    """The command lines of the bash blocks, and of inline `make ...` / `python ...` code, as word lists."""
    lines = [row for _, code, _ in code_blocks(path, "bash") for row in code.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:make|python|bash) [^`]+)`", path.read_text())
    return [shlex.split(line.split(" #")[0]) for line in lines if line.split(" #")[0].strip()]


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_named_commands_scripts_and_options_exist(path):
    """`make X` is a Makefile target; `python some/file.py --option` / `bash some/file.sh` name files of the
    repository that take those options; `raytrainer train ...` options are the CLI's."""
    targets = _makefile_targets()
    cli = (ROOT / "raytrainer" / "cli" / "main.py").read_text()
    for words in _commands(path):
        where = f"{path.relative_to(ROOT)}: {' '.join(words)}"
        if words[0] == "make":
            assert set(words[1:]) <= targets, where
        elif words[0] in ("python", "bash") and words[1:] and "/" in words[1] and words[1].endswith((".py", ".sh")):
            script = ROOT / words[1]
            assert script.exists(), where
            source = script.read_text()
            for option in (word.strip("[]").split("=")[0] for word in words[2:] if word.strip("[]").startswith("--")):
                assert f'"{option}"' in source, f"{where}: {option} is not an option of {words[1]}"
        elif "raytrainer" in words and "train" in words:
            for option in (word for word in words[words.index("train"):] if word.startswith("--")):
                assert f'"{option}"' in cli, f"{where}: {option} is not an option of raytrainer train"
