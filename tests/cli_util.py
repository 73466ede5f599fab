"""Run the real ``edgec`` entry point in-process and capture exit code and output."""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(capsys, *args: str) -> Result:
    from edgec.cli import main

    old = sys.argv
    sys.argv = ["edgec", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return Result(code, cap.out, cap.err)


def subprocess_env(**extra: str) -> dict:
    """Environment for ``python -m edgec ...`` / ``python -c`` children: this checkout first on the path."""
    import os
    from pathlib import Path

    env = dict(os.environ, **extra)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def uniform_precision(recipe: str, *, cli: bool = False) -> list[str]:
    """Overrides that switch the measured precision choice (edgec.mixed_precision) off in every quantizing
    stage of ``recipe`` (a shipped name or a YAML path): for tests whose subject is the uniform integer
    graph (every Conv/Gemm fused, bits, parity), which must not depend on this CPU's timing. ``cli``:
    as ``--set`` arguments."""
    from edgec.recipe import QUANT_METHODS, load_recipe

    sets = [f"stages.{i}.precision.keep_slow_float=false" for i, s in enumerate(load_recipe(str(recipe)).stages)
            if s.method in QUANT_METHODS]
    return [a for s in sets for a in ("--set", s)] if cli else sets
