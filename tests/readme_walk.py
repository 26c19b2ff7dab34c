"""README.md run as a newcomer runs it: every shell block in order, in a fresh clone.

    python tests/readme_walk.py            # .ci/run calls it after README's test command

The committed HEAD of this repository is cloned into a temporary directory; each ```bash block
of README.md runs there command by command (continuation lines joined) under
`bash -e -o pipefail`, and each ```python block with `python -`. The walk stops at the first
command that exits non-zero or prints a Python traceback; warnings pass (they are not its
business). Commands run in a virtualenv of their own whose site-packages also reach this
interpreter's, so the heavy dependencies are reused and README's `pip install -e .` installs the
clone there rather than repointing this environment's install; PYTHONPATH, JAX_* and XLA_* are
unset, as in a new shell.

A command whose last `&&` part is a line of .ci/run (README's test command, which .ci/run runs
verbatim just before the walk) is skipped: CI has run it. README.md stays literal for its
readers; a command's trailing comment may end in one marker:

    # [CI skips: <why>]              it needs what CI lacks (a SLURM cluster, a TPU VM, a GPU)
    # [CI runs: --flag=value ...]    CI runs it with these flags (each replaces the command's
                                     flag of that name, or is added): the README's small
                                     variant, e.g. a :tiny config

Not pytest-collected (its name): tests/test_readme.py checks its parsing and the README's
markers in the suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"\s*#[^\n#]*?\[CI (skips|runs):\s*(.*?)\]\s*$")
TRACEBACK = "Traceback (most recent call last)"
FRESH_SHELL_UNSET = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")


@dataclasses.dataclass(frozen=True)
class Command:
  text: str  # as README.md writes it (continuation lines joined with "\\\n")
  lang: str  # "bash" | "python"
  skip: str = ""  # why CI skips it
  flags: tuple[str, ...] = ()  # the [CI runs: ...] flags

  @property
  def ci_text(self) -> str:
    """The command CI runs: README's text with the marker's flags put in."""
    text = self.text
    for flag in self.flags:
      name = flag.split("=", 1)[0]
      pattern = re.compile(rf"(?<!\S){re.escape(name)}(=\S*)?(?!\S)")
      if pattern.search(text):
        text = pattern.sub(lambda _: flag, text, count=1)
      else:
        text = f"{text} {flag}"
    return text


def commands(readme: str) -> list[Command]:
  """README's shell and python blocks, in order, as commands with their markers."""
  out = []
  for lang, body in FENCE.findall(readme):
    if lang == "python":
      out.append(Command(body, "python"))
    if lang != "bash":
      continue
    pending: list[str] = []
    for line in body.splitlines():
      if not pending and (not line.strip() or line.lstrip().startswith("#")):
        continue  # blank lines and whole-line comments between commands
      pending.append(line)
      if line.endswith("\\"):
        continue
      out.append(_command("\n".join(pending)))
      pending = []
    if pending:
      raise ValueError(f"README.md: a bash block ends in a continuation line: {pending[-1]!r}")
  return out


def _command(text: str) -> Command:
  m = MARKER.search(text)
  if not m:
    return Command(text, "bash")
  kind, arg = m.groups()
  text = text[:m.start()]
  if kind == "skips":
    return Command(text, "bash", skip=arg or "no reason given")
  return Command(text, "bash", flags=tuple(shlex.split(arg)))


def ci_run_lines(repo: str) -> set[str]:
  """The command lines of <repo>/.ci/run (comments and blank lines left out)."""
  with open(os.path.join(repo, ".ci", "run")) as f:
    return {line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")}


def skip_ci_ran(cmds: list[Command], ci_lines: set[str]) -> list[Command]:
  """`cmds` with those whose last `&&` part .ci/run runs (the test command) marked skipped."""
  return [dataclasses.replace(c, skip=".ci/run runs it first")
          if not c.skip and c.text.split("&&")[-1].strip() in ci_lines else c for c in cmds]


def make_venv(path: str) -> str:
  """A virtualenv whose site-packages reach this interpreter's (a plain path line in a .pth, so
  that this environment's own .pth files, its editable pn-jax among them, are not run)."""
  subprocess.run([sys.executable, "-m", "venv", path], check=True)
  here = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
  site = subprocess.run([os.path.join(path, "bin", "python"), "-c",
                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, "zz_reuse_parent_site_packages.pth"), "w") as f:
    f.write("\n".join(sorted(here)) + "\n")
  return path


def fresh_env(venv: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in FRESH_SHELL_UNSET and not k.startswith(("JAX_", "XLA_"))}
  env["VIRTUAL_ENV"] = venv
  env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env.get("PATH", "")
  return env


def run_one(cmd: Command, cwd: str, env: dict, timeout: float) -> tuple[bool, str, float]:
  """-> (ok, output, seconds): ok = exit 0 and no traceback in stdout/stderr."""
  argv = (["bash", "-e", "-o", "pipefail", "-c", cmd.ci_text] if cmd.lang == "bash"
          else ["python", "-"])
  t0 = time.perf_counter()
  try:
    p = subprocess.run(argv, cwd=cwd, env=env, input=cmd.text if cmd.lang == "python" else None,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    return False, out + f"\n[readme_walk] timed out after {timeout:.0f} s", timeout
  seconds = time.perf_counter() - t0
  out = p.stdout
  if p.returncode != 0:
    out += f"\n[readme_walk] exit code {p.returncode}"
  elif TRACEBACK in out:
    out += "\n[readme_walk] exit 0, but the output holds a Python traceback"
  return p.returncode == 0 and TRACEBACK not in out, out, seconds


def walk(repo: str, workdir: str, timeout: float) -> int:
  clone = os.path.join(workdir, "pn-jax")
  subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", repo, clone], check=True)
  with open(os.path.join(clone, "README.md")) as f:
    cmds = skip_ci_ran(commands(f.read()), ci_run_lines(clone))
  env = fresh_env(make_venv(os.path.join(workdir, "venv")))
  logs = os.path.join(workdir, "logs")  # each command's output, <i>.txt
  os.makedirs(logs, exist_ok=True)
  t0 = time.perf_counter()
  ran = 0
  for i, cmd in enumerate(cmds, 1):
    shown = " ".join(cmd.ci_text.replace("\\\n", " ").split())
    if cmd.lang == "python":
      shown = "python - <<README's python block>>"
    if cmd.skip:
      print(f"[{i}/{len(cmds)}] skipped ({cmd.skip}): {shown}", flush=True)
      continue
    ok, out, seconds = run_one(cmd, clone, env, timeout)
    ran += 1
    with open(os.path.join(logs, f"{i:02d}.txt"), "w") as f:
      f.write(f"$ {cmd.ci_text}\n{out}")
    print(f"[{i}/{len(cmds)}] {'ok' if ok else 'FAILED'} {seconds:6.1f} s: {shown}", flush=True)
    if not ok:
      tail = "\n".join(out.replace("\r", "\n").splitlines()[-80:])
      print(f"--- its output (last 80 lines) ---\n{tail}", flush=True)
      print(f"README walk failed at command {i} (clone kept in {clone})", file=sys.stderr)
      return 1
  print(f"README walk: {ran} commands ran, {len(cmds) - ran} skipped, "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 help="repository to clone (its committed HEAD)")
  p.add_argument("--workdir", default="", help="where the clone, venv and logs/ go (default: a "
                 "new temporary directory, removed after a walk that passes)")
  p.add_argument("--timeout", type=float, default=900, help="seconds per command")
  args = p.parse_args(argv)
  if args.workdir:
    os.makedirs(args.workdir, exist_ok=True)
    return walk(args.repo, args.workdir, args.timeout)
  tmp = tempfile.mkdtemp(prefix="readme_walk_")
  rc = walk(args.repo, tmp, args.timeout)
  if rc == 0:
    shutil.rmtree(tmp)
  return rc


if __name__ == "__main__":
  sys.exit(main())
