"""Run an entry point as `python -m <module>` in a subprocess in which the test-only packages cannot be imported.

The runtime install (`make install` / `make run`) has no torch, peft or accelerate; the test venv has them, so an
in-process test would not notice a runtime path that imports one. Before anything else runs, the subprocess wraps
every `sys.meta_path` finder so that it does not find those packages: `import torch` raises ModuleNotFoundError
("No module named 'torch'"), `importlib.util.find_spec("torch")` is None (what transformers'
`is_torch_available()` reads) and `"torch" not in sys.modules` (what scipy's array-API helpers read), as on a
machine where torch is not installed.
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_ONLY = ("torch", "peft", "accelerate")

_PRELUDE = """
import importlib.util, runpy, sys

class _Hide:
    # wraps a meta-path finder: blocked top-level packages (and their submodules) are not found
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [_Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
for name in {blocked!r}:
    assert name not in sys.modules and importlib.util.find_spec(name) is None, name
sys.argv = {argv!r}
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def run_runtime_only(module: str, *args: str, timeout: float = 1800) -> str:
  """Run `python -m module *args` from the repository root with torch / peft / accelerate unimportable.

  Returns the combined stdout + stderr. Raises AssertionError with the output's tail when the exit status is not 0.
  """
  code = _PRELUDE.format(blocked=TEST_ONLY, argv=[module, *args], module=module)
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"python -m {module} {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}"
  return out
