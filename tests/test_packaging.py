"""The package as pip builds it: an sdist, and a wheel built from that sdist, hold every module and
the C++/CUDA sources (for the JIT fallback); editable reinstalls reuse the compiled objects; the
tree holds no tools or build outputs. (CI also installs the wheels in a fresh venv: .ci/check_wheel.sh.)"""
import os
import runpy
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"


def _tracked() -> list[str] | None:
    try:
        return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(sdist, wheel built from it, unpacked wheel): pure Python (FASTVAE_BUILD_EXT=0), so no compile."""
    tmp = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "FASTVAE_BUILD_EXT": "0"}
    sdist = tmp / subprocess.run([sys.executable, "-c", BUILD, "build_sdist", str(tmp)], cwd=ROOT, env=env, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "src", filter="data")
    (src,) = (tmp / "src").iterdir()
    built = src / "dist"
    whl = built / subprocess.run([sys.executable, "-c", BUILD, "build_wheel", str(built)], cwd=src, env=env, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
    site = tmp / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
    return sdist, whl, site


def _sources() -> list[Path]:
    """Every Python module of the package (fastvae/, kernels/) and every C++/CUDA source (csrc/)."""
    found = [p for top in ("fastvae", "kernels") for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts]
    return found + [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")]


def _installed_name(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    return rel if rel.startswith("fastvae/") else "fastvae/" + rel  # kernels/ -> fastvae/kernels/, csrc/ -> fastvae/csrc/


def test_wheel_from_the_sdist_holds_every_module_and_the_csrc_sources(wheel):
    _, whl, _ = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    missing = [_installed_name(p) for p in _sources() if _installed_name(p) not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "fastvae/models/aae.py" in names and "fastvae/csrc/cpu/avx2.cpp" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fastvae = fastvae.cli:main" in zipfile.ZipFile(whl).read(entry_points).decode()


def test_installed_package_imports_and_finds_its_jit_sources(wheel):
    _, _, site = wheel
    check = ("import fastvae, fastvae.models, fastvae.kernels, fastvae.cli, fastvae._build as b; from pathlib import Path; "
             "fastvae.models.get('aae'); print(fastvae.__file__); print(b.CSRC); "
             "print(all(Path(s).is_file() for s in b.sources(True)))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    lines = subprocess.run([sys.executable, "-c", check], cwd=site.parent, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert lines == [str(site / "fastvae" / "__init__.py"), str(site / "fastvae" / "csrc"), "True"]


def test_editable_reinstall_keeps_the_compiled_objects(monkeypatch, tmp_path):
    """pip's editable builds point build_temp at a fresh temporary folder; ours stays in build/, so
    a second `pip install -e` lets ninja skip every object that is up to date."""
    pytest.importorskip("torch")
    import setuptools
    from setuptools.dist import Distribution

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.delenv("FASTVAE_BUILD_EXT", raising=False)
    runpy.run_path(str(ROOT / "setup.py"))
    temps = []
    for _ in range(2):
        dist = Distribution({"name": "fastvae", "ext_modules": captured["ext_modules"], "cmdclass": captured["cmdclass"]})
        dist.get_command_obj("build").build_temp = str(tmp_path / f"editable-{len(temps)}")  # what editable_wheel does
        cmd = dist.get_command_obj("build_ext")
        cmd.ensure_finalized()
        temps.append(Path(cmd.build_temp))
    assert temps[0] == temps[1] and temps[0].parent == ROOT / "build"
    (ext,) = captured["ext_modules"]
    assert "csrc/ops.h" in ext.depends  # a changed header relinks too


def test_no_tools_wheels_or_build_outputs_are_committed():
    tracked = _tracked()
    if tracked is None:
        pytest.skip("not a git checkout")
    outputs = (".whl", ".so", ".o", ".pyc", ".egg", ".tar.gz", ".zip", ".exe")
    assert [f for f in tracked if f.endswith(outputs) or f.startswith(("build/", "dist/"))] == []


def test_ninja_is_installed_before_the_first_build():
    """A first build by the system's ninja and a rebuild by the venv's (which `pip install -e` brings
    after building) do not share a build log: ninja 1.13 starts over on 1.11's and recompiles all.
    So README's first command installs ninja before building, CI likewise, and the package depends
    on it (a pure wheel's JIT fallback needs it too)."""
    import re
    import tomllib

    first = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    assert -1 < first.find("ninja") < first.index("pip install --no-build-isolation -e .")
    ci = (ROOT / ".ci" / "run").read_text()
    assert -1 < ci.find("pip install -q torch==2.13.0 ninja") < ci.index("pip install --no-build-isolation -e")
    assert "ninja" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
