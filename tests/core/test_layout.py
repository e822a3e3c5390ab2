"""Each plugin stays in its room: it imports other packages' public names only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"beampipe", "beampipe_ca", "beampipe_pva", "beampipe_shm", "beampipe_zocalo"}
PLUGIN_SOURCES = sorted((ROOT / "plugins").glob("*/src/beampipe_*"))


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("package", PLUGIN_SOURCES, ids=lambda p: p.name)
def test_plugins_import_only_public_modules_of_other_packages(package: Path) -> None:
    bad = []
    for source in package.rglob("*.py"):
        for line, module in _imports(source):
            parts = module.split(".")
            foreign = parts[0] in OURS and parts[0] != package.name
            if foreign and any(p.startswith("_") for p in parts[1:]):
                bad.append(f"{source.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "private modules of another package:\n" + "\n".join(bad)


def test_every_plugin_is_its_own_distribution() -> None:
    import tomllib

    names = {}
    for pyproject in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        names[pyproject.parent.name] = project["name"]
        deps = [
            d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]
        ]
        assert "beampipe" in deps, f"{pyproject} must depend on the core"
        others = {"beampipe-ca", "beampipe-pva", "beampipe-shm", "beampipe-zocalo"} - {
            project["name"]
        }
        allowed = {"beampipe-shm"} if project["name"] == "beampipe-zocalo" else set()
        assert not (set(deps) & (others - allowed)), f"{pyproject} depends on another plugin"
    assert names == {
        "ca_backend": "beampipe-ca",
        "pva_backend": "beampipe-pva",
        "shm_transport": "beampipe-shm",
        "zocalo_bridge": "beampipe-zocalo",
    }
