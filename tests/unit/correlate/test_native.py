"""The correlator compiled with mypyc (setup.py) is the same code as its Python
sources: it must be built where the install could build it, used, and give exactly
the spans the sources give; sources edited after the build must not be shadowed by
the stale build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import correlate
from sniff.store import Recorder
from tests.unit.correlate.test_offline import _mix

ROOT = Path(__file__).resolve().parents[3]

_DUMP = """
import json, sys
import correlate
from correlate.offline import all_spans
from sniff.store import CaptureReader
from tests.unit.correlate.test_offline import _fields
spans = all_spans(CaptureReader(sys.argv[1]), options={"lag_ms": 20})
print(json.dumps({"native": correlate.NATIVE, "spans": _fields(spans)}, default=repr))
"""


def _python(code: str, *args: str, pure: bool) -> str:
    """``code`` run by a new interpreter in the repository, with or without
    SNIFF_PURE_PYTHON=1: its standard output."""
    env = dict(os.environ)
    env.pop("SNIFF_PURE_PYTHON", None)
    if pure:
        env["SNIFF_PURE_PYTHON"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


def _dump(path: Path, pure: bool) -> dict[str, object]:
    res: dict[str, object] = json.loads(_python(_DUMP, str(path), pure=pure))
    return res


needs_build = pytest.mark.skipif(
    correlate._built() is None and os.environ.get("SNIFF_NO_MYPYC") == "1",
    reason="installed with SNIFF_NO_MYPYC=1: nothing compiled",
)


@needs_build
def test_the_install_compiled_the_correlator() -> None:
    # setup.py falls back to the Python sources when mypyc fails; the benchmarks'
    # figures assume it did not, so a silent fallback is a failure here
    assert correlate._built() is not None, "pip install -e . did not build correlate/_native__mypyc"
    assert not correlate._stale(correlate._built() or 0.0)
    if os.environ.get("SNIFF_PURE_PYTHON") != "1":
        assert correlate.NATIVE
        import correlate.causal as causal_module

        assert str(causal_module.__file__).endswith(".so")


@needs_build
def test_compiled_and_python_give_identical_spans(tmp_path: Path) -> None:
    events = _mix()
    path = tmp_path / "cap.db"
    rec = Recorder(path)
    for k in range(0, len(events), 97):
        rec._write(events[k : k + 97])
    rec.close()
    native = _dump(path, pure=False)
    pure = _dump(path, pure=True)
    assert native["native"] is True and pure["native"] is False
    spans = native["spans"]
    assert isinstance(spans, list) and len(spans) > 500
    assert spans == pure["spans"]


def test_sources_newer_than_the_build_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(correlate, "_HERE", str(tmp_path))
    assert correlate._built() is None
    (tmp_path / "_native__mypyc.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    built = correlate._built()
    assert built is not None
    for m in correlate.COMPILED:
        (tmp_path / f"{m}.py").write_text("")
        os.utime(tmp_path / f"{m}.py", (built, built))
    assert correlate._stale(built) == []
    os.utime(tmp_path / "causal.py", (built + 60, built + 60))  # edited a minute after
    assert correlate._stale(built) == ["causal.py"]


def test_the_python_sources_are_what_pure_mode_imports() -> None:
    out = _python(
        "import correlate, correlate.engine as e, correlate.model as m; "
        "print(correlate.NATIVE, e.__file__.endswith('.py'), m.__file__.endswith('.py'))",
        pure=True,
    ).split()
    assert out == ["False", "True", "True"]
