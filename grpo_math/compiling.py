"""--compile: whether Unsloth compiles its training kernels, decided before Unsloth is imported.

Compiled, step 1 takes minutes longer and every later step is faster; COMPILE_PAYS_BACK_STEPS is
where the one repays the other, as an H200 measured it. models.pick_backend calls set_compile() just
before it imports unsloth, which reads the choice once.
"""

import os
import sys

# --compile auto: Unsloth compiles its training kernels for runs of at least this many steps. On an H200
# (BENCHMARKS.md, "The compile"), compiling made step 1 126-161 s longer and each later step about 5 s
# shorter (16.2 s uncompiled, 10.9 s compiled: 1.5B model, G = 8, 256 tokens), so it pays back after
# 23-30 steps: the default recipe's 250 compile, a short check does not.
COMPILE_PAYS_BACK_STEPS = 30


def resolve(requested="auto", steps=None):
    """'on' or 'off' for --compile REQUESTED: auto is on for a run of ``steps`` >= COMPILE_PAYS_BACK_STEPS."""
    if requested == "auto":
        return "on" if steps is None or steps >= COMPILE_PAYS_BACK_STEPS else "off"
    return requested


def set_compile(requested="auto", steps=None):
    """'on' or 'off' (resolve() above): whether Unsloth compiles its training kernels. Unsloth reads it from
    UNSLOTH_COMPILE_DISABLE once, when it is imported, so this runs first; in a process that imported it
    already (a notebook's second run), the first choice stands and a line says so."""
    mode = resolve(requested, steps)
    if "unsloth_zoo" in sys.modules:
        from unsloth_zoo.temporary_patches.common import UNSLOTH_COMPILE_DISABLE

        in_effect = "off" if UNSLOTH_COMPILE_DISABLE else "on"
        if in_effect != mode:
            print(f"--compile {requested}: Unsloth was imported in this process with its compile {in_effect}, "
                  f"which stands; restart the process (the notebook's kernel) for --compile {mode}")
        return in_effect
    os.environ["UNSLOTH_COMPILE_DISABLE"] = "1" if mode == "off" else "0"
    return mode


# An H200 showed it (BENCHMARKS.md, "The compile"): 204 s for the first step, then 11 s a step.
FIRST_STEP_NOTE = ("step 1 also compiles Unsloth's training kernels (--compile on): minutes before its line (3.4 "
                   "on an H200, 1.5B model, 256 tokens); the steps after it are about a third faster")
