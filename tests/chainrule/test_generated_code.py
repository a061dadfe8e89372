"""The committed code in chainrule/v1 is exactly what `make proto` generates from proto/.

Like flower's dev/check-protos.sh: regenerate into a temporary folder and fail on any
difference, so nobody edits generated code by hand or forgets to regenerate after a .proto
change.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTO_SOURCES = PROTO_DIR / "chainrule" / "v1"
PACKAGE_DIR = ROOT / "chainrule" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generated_files(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(folder.iterdir())
            if path.name.endswith(GENERATED_SUFFIXES)}


def _regenerate(out_dir: Path) -> None:
    # The same command as the Makefile's `proto` target, with the output in out_dir.
    protos = sorted(str(path.relative_to(ROOT)) for path in PROTO_SOURCES.glob("*.proto"))
    command = [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={out_dir}",
               f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_committed_generated_code_matches_a_fresh_protoc_run(tmp_path):
    _regenerate(tmp_path)
    fresh = _generated_files(tmp_path / "chainrule" / "v1")
    committed = _generated_files(PACKAGE_DIR)
    assert fresh, "protoc generated nothing"
    stale = sorted(set(committed) - set(fresh))
    missing = sorted(set(fresh) - set(committed))
    assert not stale, f"generated files without a .proto (delete them): {stale}"
    assert not missing, f"run `make proto` and commit: {missing} are not generated yet"
    changed = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not changed, f"run `make proto` and commit: {changed} differ from protoc's output"


def test_every_proto_source_has_its_python_module():
    for proto in PROTO_SOURCES.glob("*.proto"):
        assert (PACKAGE_DIR / f"{proto.stem}_pb2.py").exists(), proto.name


def test_generated_code_imports_as_chainrule_v1_job_pb2():
    from chainrule.v1 import job_pb2

    spec = job_pb2.JobSpec(name="x")
    assert job_pb2.JobSpec.FromString(spec.SerializeToString()).name == "x"
    assert job_pb2.DESCRIPTOR.package == "chainrule.v1"
