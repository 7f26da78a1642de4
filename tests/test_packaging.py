"""Packaging: one ONNX Runtime build per documented install, a one-line error without any, every
imported package declared, and CLI logging confined to the ``onnxprune`` logger."""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from graphs import tiny_vgg

from onnxprune import cli

ERROR = "onnxprune: error: "
INSTALLS = ('pip install "onnxprune[cpu]"', 'pip install "onnxprune[gpu]"')


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def _project() -> dict:
    return _pyproject()["project"]


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()).lower()


def test_exactly_one_onnxruntime_build_per_install():
    project = _project()
    base = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    builds = {"onnxruntime", "onnxruntime-gpu"}
    assert not base & builds
    assert extras["cpu"] & builds == {"onnxruntime"} and extras["gpu"] & builds == {"onnxruntime-gpu"}
    assert not extras["test"] & builds  # users combine .[cpu,test]
    assert all(not deps & builds for name, deps in extras.items() if name not in ("cpu", "gpu"))
    assert "onnx-graphsurgeon" not in base  # nothing imports it


def test_every_imported_package_is_declared():
    """Each third-party module onnxprune imports comes from a declared dependency (ONNX Runtime
    from the cpu or gpu extra)."""
    project = _project()
    declared = {_name(r) for r in project["dependencies"]}
    runtime = {_name(r) for k in ("cpu", "gpu") for r in project["optional-dependencies"][k]}
    modules = set()
    for path in (ROOT / "onnxprune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"onnxprune"}
    assert {"onnx", "numpy", "threadpoolctl", "onnxruntime"} <= modules  # the scan works
    dists = importlib.metadata.packages_distributions()
    for module in sorted(modules):
        names = {_name(d) for d in dists.get(module, [])}
        assert names, f"{module} is not installed"
        wanted = runtime if module == "onnxruntime" else declared
        assert names & wanted, f"{module} ({', '.join(sorted(names))}) is imported but not declared"


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    command = next(line for line in readme if line.strip().endswith("python -m pytest -q"))
    install = re.search(r'pip install -e "\.\[[a-z,]+\]" && python -m pytest -q', command).group()
    assert '".[cpu,test]"' in install
    assert install.replace("pip install -e", "pip install -q -e") in (ROOT / ".ci" / "run").read_text()
    first = next(line for line in readme if "pip install" in line)  # install and prune an example
    assert 'pip install -e ".[cpu]" && onnxprune ' in first


def test_slow_marker_is_registered_and_runs_by_default():
    ini = _pyproject()["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow:") for m in ini["markers"]) and "slow" not in ini.get("addopts", "")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--strict-markers", "-m", "slow",
                           "-p", "no:cacheprovider", "tests/test_bench_single_layer.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "test_bench_single_layer.py::test_quick_run" in proc.stdout, proc.stdout


WITHOUT_ORT = "import sys; sys.modules['onnxruntime'] = None; "  # `import onnxruntime` now raises ImportError


def _without_ort(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_ORT + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "m.onnx"], ["m.onnx", "--speedup", "2"]])
def test_cli_without_onnxruntime_is_one_line_exit_2(argv):
    proc = _without_ort(f"import onnxprune.cli; sys.exit(onnxprune.cli.main({argv!r}))")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), proc.stderr
    assert "ONNX Runtime is not installed" in lines[0] and all(i in lines[0] for i in INSTALLS), lines[0]
    assert proc.stdout == ""  # no help text, no traceback


def test_python_m_without_onnxruntime_is_one_line_exit_2():
    proc = _without_ort("import runpy; sys.argv = ['onnxprune', 'm.onnx']; "
                        "runpy.run_module('onnxprune', run_name='__main__')")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(ERROR), proc.stderr


def test_library_without_onnxruntime_raises_import_error_naming_both_installs():
    proc = _without_ort(
        "import onnxprune\n"
        "try:\n"
        "    from onnxprune import prune\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, isinstance(exc, onnxprune.PruneError)); print(exc); sys.exit(0)\n"
        "sys.exit(1)\n")
    assert proc.returncode == 0, proc.stderr
    kind, message = proc.stdout.splitlines()  # the message is one line
    assert kind == "MissingRuntimeError True"
    assert message.startswith("ONNX Runtime is not installed") and all(i in message for i in INSTALLS), message


def test_the_library_never_configures_logging():
    """Only the CLI sets logging up, and only on the ``onnxprune`` logger."""
    for path in (ROOT / "onnxprune").rglob("*.py"):
        text = path.read_text()
        assert "basicConfig" not in text and "getLogger()" not in text, path
        if path.name != "cli.py":
            assert "addHandler" not in text and "setLevel" not in text, path
    proc = subprocess.run([sys.executable, "-c", "import logging, onnxprune, onnxprune.cli; "
                           "print(logging.getLogger().handlers, logging.getLogger('onnxprune').handlers)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["[]", "[]"], proc.stderr


def test_cli_configures_only_the_onnxprune_logger(tmp_path, capfd):
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save_model(tiny_vgg(), model)
    root = logging.getLogger()
    root_before = (root.handlers[:], root.level)
    for argv, level in (([str(model), "-v"], logging.INFO), ([str(model), "-q"], logging.ERROR),
                        ([str(model)], logging.WARNING)):
        capfd.readouterr()
        assert cli.main(["inspect", *argv]) == 0
        assert (root.handlers, root.level) == root_before  # the root logger is left alone
        logger = logging.getLogger("onnxprune")
        assert logger.level == level and logger.propagate is False
        mine = [h for h in logger.handlers if getattr(h, "onnxprune_cli", False)]
        assert len(mine) == 1  # one handler however often main runs
        assert isinstance(mine[0], logging.StreamHandler) and mine[0].stream is sys.stderr

    seen: list[logging.LogRecord] = []
    probe = logging.Handler()
    probe.emit = seen.append
    root.addHandler(probe)
    try:
        capfd.readouterr()
        logging.getLogger("onnxprune.graph").warning("a warning from the library")
        logging.getLogger("onnxprune.graph").info("an info below the level")
    finally:
        root.removeHandler(probe)
    assert capfd.readouterr().err.splitlines() == ["WARNING onnxprune.graph: a warning from the library"]
    assert seen == []  # nothing reached the root logger's handlers
