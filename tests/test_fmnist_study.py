"""tools/fmnist_study.sh with a stand-in `ssni` that records its calls: the stages' order, the thread
counts the networks are trained at, failures reported per stage, the restore and the reweight skip."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env bash
echo "$* threads=$SSNI_THREADS" >> "$STUDY_CALLS"
case " $FAIL " in *" $1 "*) exit 3 ;; esac
if [ "$1" = calibrate ]; then mkdir -p runs/fmnist/calibration && echo '{}' > runs/fmnist/calibration/calibration.json; fi
"""


def _study(tmp_path, *stages, fail="", restore=True):
    """Run the script from a copy of the tools in tmp_path; (exit code, output, the calls made)."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    (tmp_path / "tools").mkdir(exist_ok=True)
    for name in ("fmnist_study.sh", "study_state.py"):
        shutil.copy(ROOT / "tools" / name, tmp_path / "tools" / name)
    stub = tmp_path / "ssni-stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    bindir = tmp_path / "bin"  # the script's python3 is the one running the tests
    bindir.mkdir(exist_ok=True)
    if not (bindir / "python3").exists():
        (bindir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "SSNI": str(stub), "STUDY_CALLS": str(calls), "FAIL": fail, "SSNI_THREADS": "2",
           "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "STUDY_RESTORE": "1" if restore else "0"}
    p = subprocess.run(["bash", str(tmp_path / "tools" / "fmnist_study.sh"), *stages], env=env,
                       capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr, sorted(calls.read_text().splitlines())


def test_networks_train_at_the_recorded_threads_and_failures_are_named_once(tmp_path):
    rc, out, calls = _study(tmp_path, "tstar", "networks", fail="evaluate")
    assert rc == 1
    # tstar's failure is tstar's, not the networks' (the trainings run in subshells of their own)
    assert "failed stages: tstar\n" in out
    assert calls == ["calibrate recipes/fmnist/calibrate.yaml threads=2",
                     "evaluate recipes/fmnist/dbp_tstar.yaml threads=2",
                     "train-classifier recipes/fmnist/classifier.yaml threads=1",
                     "train-score recipes/fmnist/score.yaml threads=1"]


def test_a_failed_training_is_reported_and_no_calibration_follows_it(tmp_path):
    rc, out, calls = _study(tmp_path, "networks", fail="train-classifier")
    assert rc == 1 and "failed stages: networks-classifier\n" in out
    assert not any(c.startswith("calibrate") for c in calls)


def test_the_committed_state_is_restored_first_and_a_restored_reweight_is_not_refitted(tmp_path):
    snap = tmp_path / "results" / "fmnist" / "state"
    (snap / "reweight").mkdir(parents=True)
    (snap / "reweight" / "reweight.json").write_text('{"name": "learned"}')
    (snap / "eval" / "state").mkdir(parents=True)
    (snap / "eval" / "state" / "fingerprint.json").write_text(json.dumps({"fingerprint": "a"}))
    rc, out, calls = _study(tmp_path, "reweight", "eval")
    assert rc == 0, out
    assert (tmp_path / "runs/fmnist/eval/state/fingerprint.json").is_file()
    assert calls == ["evaluate recipes/fmnist/eval.yaml threads=2"]  # no fit-reweight
    assert "reweight.json exists" in out
    # a clash with this machine's own state is reported, and the stages still run on it
    (tmp_path / "runs/fmnist/eval/state/fingerprint.json").write_text(json.dumps({"fingerprint": "b"}))
    rc, out, calls = _study(tmp_path, "eval")
    assert rc == 1 and "failed stages: restore\n" in out and calls == ["evaluate recipes/fmnist/eval.yaml threads=2"]
    # STUDY_RESTORE=0 leaves the committed state alone
    rc, out, calls = _study(tmp_path, "eval", restore=False)
    assert rc == 0 and "restore" not in out
