"""Static checks of the Dockerfiles: what they copy exists, what they install is defined."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    assert not pending, f"{dockerfile.name} ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


def copy_sources(dockerfile: Path) -> list[str]:
    """Paths that COPY/ADD take from the build context (not from another stage)."""
    sources = []
    for op, args in instructions(dockerfile):
        if op not in ("COPY", "ADD"):
            continue
        words = args.split()
        if any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        sources += paths[:-1]
    return sources


def pip_installs(dockerfile: Path) -> list[str]:
    """Every ``pip install`` command of the RUN instructions."""
    commands = []
    for op, args in instructions(dockerfile):
        if op == "RUN":
            commands += [c.strip() for c in re.split(r"&&|;", args) if re.search(r"\bpip install\b", c)]
    return commands


def git_ignores(path: str) -> bool:
    """Whether git ignores ``path`` (then a fresh clone does not have it)."""
    if not (ROOT / ".git").exists():
        return False
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False).returncode == 0


def defined_extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"])


def test_there_are_dockerfiles() -> None:
    assert {p.name for p in DOCKERFILES} == {"dev.Dockerfile", "sidecar.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist(dockerfile: Path) -> None:
    sources = copy_sources(dockerfile)
    assert sources, f"{dockerfile.name} copies nothing from the repository"
    missing = [s for s in sources if not (ROOT / s).exists() or git_ignores(s)]
    assert not missing, f"{dockerfile.name} copies paths missing from the repository (or git-ignored): {missing}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_installed_extras_are_defined(dockerfile: Path) -> None:
    extras = {
        extra.strip()
        for command in pip_installs(dockerfile)
        for group in re.findall(r"\[([\w,\s-]+)\]", command)
        for extra in group.split(",")
    }
    assert "ucx" in extras, f"{dockerfile.name} must install the ucx extra"
    undefined = extras - defined_extras()
    assert not undefined, f"{dockerfile.name} installs extras that pyproject.toml does not define: {undefined}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_local_editable_installs_exist(dockerfile: Path) -> None:
    paths = [
        match.strip("'\"").split("[")[0]
        for command in pip_installs(dockerfile)
        for match in re.findall(r"-e\s+(\S+)", command)
    ]
    missing = [p for p in paths if not (ROOT / p / "pyproject.toml").exists()]
    assert not missing, f"{dockerfile.name} installs local packages that have no pyproject.toml: {missing}"


def test_dev_image_is_an_editable_install_with_dev_and_ucx() -> None:
    commands = pip_installs(ROOT / "docker" / "dev.Dockerfile")
    assert any(re.search(r"-e\s+'?\.\[dev,ucx\]'?", c) for c in commands), commands


def test_parser_sees_continued_lines_and_stage_copies(tmp_path: Path) -> None:
    dockerfile = tmp_path / "x.Dockerfile"
    dockerfile.write_text(
        "FROM base AS b\n# comment\nCOPY --chown=1:1 a.txt \\\n    b/ /dst/\nCOPY --from=b /x /y\n"
        "RUN apt-get update && pip install -e '.[one, two]' && echo done\n"
    )
    assert copy_sources(dockerfile) == ["a.txt", "b/"]
    assert pip_installs(dockerfile) == ["pip install -e '.[one, two]'"]
