"""A job script run in a fresh interpreter where some top-level modules cannot be imported (a
machine without them): a meta-path finder refuses them and records every attempt, printed as
``BLOCKED_IMPORTS_TRIED [...]`` when the script ends."""

from __future__ import annotations

__all__ = ["blocked_run"]


def blocked_run(script: str, blocked: set[str]) -> str:
    """The ``python -c`` source that runs ``script`` (argv after it) with ``blocked`` refused."""
    return f"""
import importlib.abc, runpy, sys
BLOCK, tried = {sorted(blocked)!r}, []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            tried.append(name)
            raise ModuleNotFoundError(f"{{name}} is blocked (no such module on this machine)")
sys.meta_path.insert(0, Blocker())
sys.argv = [{script!r}, *sys.argv[1:]]
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    print("BLOCKED_IMPORTS_TRIED", sorted(set(tried)))
"""
