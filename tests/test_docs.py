"""The docs stay true: the settings reference matches the models, links and paths resolve."""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path

import pytest

from sidecar_core import SidecarSettings
from sidecar_core._plugins import get_registry
from sidecar_core._settings_doc import REGENERATE, builtin_transport_settings, env_names, render

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_settings_reference_is_up_to_date() -> None:
    checked_in = (ROOT / "docs" / "settings.md").read_text()
    generated = render()
    if checked_in != generated:
        diff = "".join(
            difflib.unified_diff(
                checked_in.splitlines(keepends=True),
                generated.splitlines(keepends=True),
                "docs/settings.md (checked in)",
                "generated from the settings models",
                n=1,
            )
        )
        pytest.fail(
            f"docs/settings.md is out of date with the settings models. Regenerate it with:\n  {REGENERATE}\n{diff}"
        )


def test_settings_reference_names_every_variable_and_builtin_transport() -> None:
    text = render()
    for field in SidecarSettings.model_fields:
        for env in env_names(SidecarSettings, field):
            assert f"`{env}`" in text
    for name, cls, problem in builtin_transport_settings(get_registry()):
        assert not problem
        assert f"## Transport `{name}`" in text
        if cls is not None:
            for field in cls.model_fields:
                assert f"`{env_names(cls, field)[0]}`" in text
    assert "| `SIDECAR_AUTH_TOKEN` | secret or unset | unset |" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_repository_paths_mentioned_exist(page: Path) -> None:
    mentioned = set(
        re.findall(r"`((?:docker|docs|tests|sidecar_core|transports|serializers)/[\w./-]+)`", page.read_text())
    )
    missing = sorted(p for p in mentioned if not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"{page.relative_to(ROOT)} mentions paths that do not exist: {missing}"


GUIDES = [ROOT / "docs" / "plugins-transport.md", ROOT / "docs" / "plugins-serializer.md"]
EXCERPT = re.compile(r"```\w*\n# file: (\S+)\n(.*?)```", flags=re.S)


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_plugin_guide_excerpts_match_the_example_packages(guide: Path) -> None:
    excerpts = EXCERPT.findall(guide.read_text())
    assert excerpts, f"{guide.name} quotes no example file"
    for path, body in excerpts:
        assert path.startswith("tests/plugins/sidecar-example-"), path
        source = [line for line in (ROOT / path).read_text().splitlines() if line.strip()]
        quoted = [line for line in body.splitlines() if line.strip()]
        runs = (source[i : i + len(quoted)] for i in range(len(source) - len(quoted) + 1))
        assert quoted in runs, f"{guide.name} quotes {path}, but the file no longer contains:\n" + "\n".join(quoted)


def readme_commands() -> dict[str, str]:
    """The README's commands, each a one-line code block between ``<!-- NAME-command:begin/end -->``."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- (\w+)-command:begin -->\n```sh\n(.+?)\n```\n<!-- \1-command:end -->", text, flags=re.S)
    return dict(blocks)


def test_readme_has_the_demo_and_test_commands() -> None:
    commands = readme_commands()
    assert set(commands) == {"demo", "test"}
    assert all("\n" not in command for command in commands.values())
    assert commands["demo"].endswith("&& sidecar demo")
    assert commands["test"].endswith("&& pytest")


@pytest.mark.parametrize("name", ["demo", "test"])
def test_readme_command_installs_only_what_exists(name: str) -> None:
    command = readme_commands()[name]
    extras = {e.strip() for group in re.findall(r"\.\[([\w,\s-]+)\]", command) for e in group.split(",")}
    defined = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert extras <= defined, f"README {name} command installs undefined extras {extras - defined}"
    local = [p.strip("'\"").split("[")[0] for p in re.findall(r"-e\s+(\S+)", command)]
    missing = [p for p in local if not (ROOT / p / "pyproject.toml").exists()]
    assert not missing, f"README {name} command installs local packages without a pyproject.toml: {missing}"
