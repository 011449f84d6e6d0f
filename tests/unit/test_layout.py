"""The tree as the README draws it: every package installed, small modules,
and dependencies that run one way (the milter stands on the library)."""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = {"flushctl": ROOT / "flushctl", "flushctl_milter": ROOT / "milter" / "flushctl_milter",
                "postfix": ROOT / "postfix"}
MAX_LINES = 400   # "about 350": a module past this has more than one job


def packages_on_disk() -> set[str]:
    found = set()
    for top, folder in PACKAGE_DIRS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((top, *rel)))
    return found


def modules():
    for top, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            yield top, path


def test_every_package_is_installed():
    # an editable install finds a package the list forgets; pip install (the role) does not
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == packages_on_disk()


@pytest.mark.parametrize("path", [p for _, p in modules()], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_has_grown_past_one_job(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def imported(nodes) -> set[str]:
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_library_never_imports_the_milter_at_load_time():
    """flushctl_milter imports flushctl; flushctl reaches the milter only inside
    the `milter` command."""
    anywhere = []
    for top, path in modules():
        if top != "flushctl":
            continue
        tree = ast.parse(path.read_text())
        assert "flushctl_milter" not in imported(tree.body), path
        if "flushctl_milter" in imported(ast.walk(tree)):
            anywhere.append(path.relative_to(ROOT).as_posix())
    assert anywhere == ["flushctl/cli/daemons.py"]
