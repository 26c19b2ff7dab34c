"""README.md's commands: the walk's parsing (tests/readme_walk.py, run whole by .ci/run) and the
properties of the README that the suite can check in seconds."""

import collections
import math
import re

from conftest import REPO
import readme_walk


def _readme_commands():
  return readme_walk.commands((REPO / "README.md").read_text())


def test_walk_splits_blocks_into_commands_and_honours_markers():
  readme = "\n".join([
      "text", "```bash", "# a comment line", "pip install -e . && echo hi", "",
      "python -m x --config=a.py --workdir=w \\", "    --mode=eval  # [CI runs: --config=a.py:tiny --steps=3]",
      "sbatch job  # 4 nodes [CI skips: needs SLURM]", "```", "```text", "not a command", "```",
      "```python", "print(1)", "```", ""])
  cmds = readme_walk.commands(readme)
  assert [c.lang for c in cmds] == ["bash", "bash", "bash", "python"]
  assert cmds[0].ci_text == "pip install -e . && echo hi" and not cmds[0].skip
  assert cmds[1].ci_text == ("python -m x --config=a.py:tiny --workdir=w \\\n    --mode=eval"
                             " --steps=3")
  assert cmds[2].skip == "needs SLURM"
  assert cmds[3].text == "print(1)\n"


def test_the_test_command_is_in_ci_run_verbatim_and_the_walk_skips_only_it():
  """.ci/run runs README's test command as written, so the walk leaves it (and only it) out."""
  ci_lines = readme_walk.ci_run_lines(str(REPO))
  cmds = readme_walk.skip_ci_ran(_readme_commands(), ci_lines)
  ran_by_ci = [c for c in cmds if c.skip == ".ci/run runs it first"]
  assert len(ran_by_ci) == 1 and "python -m pytest" in ran_by_ci[0].text, ran_by_ci
  test_command = ran_by_ci[0].text.split("&&")[-1].strip()
  assert test_command == ("XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest "
                          "-n 2 -q tests")
  assert test_command in (REPO / ".ci" / "run").read_text().splitlines()
  assert "#" not in ran_by_ci[0].text  # README's line is the command alone


def test_every_readme_journey_has_workdirs_of_its_own():
  """Run in order, a section must not pretrain or specialize into a workdir an earlier section
  filled with another model: that run exits 2 ("use a fresh --workdir")."""
  writers = collections.defaultdict(list)
  for cmd in _readme_commands():
    text = cmd.text.replace("\\\n", " ")
    workdir = re.search(r"--workdir=(\S+)", text)
    if cmd.lang != "bash" or "pn_jax.main" not in text or not workdir:
      continue
    mode = re.search(r"--mode=(\S+)", text)
    if (mode.group(1) if mode else "pretrain") in ("pretrain", "specialize", "importance"):
      writers[workdir.group(1)].append(" ".join(text.split()))
  assert writers, "no training command found in README.md"
  shared = {w: c for w, c in writers.items() if len(c) > 1}
  assert not shared, f"README.md trains into one workdir twice: {shared}"


def test_readme_mesh_examples_run_on_a_cpu_as_written():
  """A command that sets a mesh of n > 1 devices also makes a CPU show n devices (XLA_FLAGS in
  the command), so it runs as written on the CPU the README's other commands assume; the walk
  runs it (tests/readme_walk.py)."""
  mesh = [c for c in _readme_commands()
          if "pn_jax.main" in c.text and "--config.mesh." in c.text and not c.skip]
  assert mesh, "README.md has no mesh-override example"
  for cmd in mesh:
    sizes = [int(n) for n in re.findall(r"--config\.mesh\.\w+=(\d+)", cmd.text)]
    devices = re.search(r"^XLA_FLAGS=--xla_force_host_platform_device_count=(\d+) ", cmd.text)
    assert devices and int(devices.group(1)) >= math.prod(sizes), cmd.text
