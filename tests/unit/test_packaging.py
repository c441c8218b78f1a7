"""pyproject.toml lists the packages explicitly (tracer.bpf maps to the top-level bpf/): every
package of the tree must be in that list, or a wheel would silently lack it."""
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[2]


def test_every_package_of_the_tree_is_packaged():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tracer").rglob("__init__.py")}
    assert set(config["packages"]) == tree | {"tracer.bpf"}
    assert config["package-dir"] == {"tracer.bpf": "bpf"}
    assert set(config["package-data"]["tracer.bpf"]) == {"*.c", "*.h"}
