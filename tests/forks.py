"""Script runs as processes forked from one that has already imported torch, transformers, trl, peft and
datasets: each run skips the 7-8 s those imports cost a fresh interpreter, which is most of a smoke run.

    python tests/forks.py                       # the server: reads one JSON command a line on stdin
    python tests/forks.py --unsloth off|on      # one for tests/unsloth_cpu.py and unsloth_tools_cpu.py:
                         [--unpatched]          # Unsloth imported (its compile off or on), trl patched or not

Each run is a process of its own, as ``python SCRIPT FLAGS`` would be: its own exit code (a negative one
for a signal, as subprocess gives it), its own output files, and a kill or a Ctrl-C reaches it alone. What
differs from a fresh interpreter is only that those libraries were imported before the script ran, and in
the order below; so this runs only scripts whose backend is trl, and the tests of the import order itself
(tests/test_hardware.py) start fresh interpreters. With --unsloth, Unsloth is what was imported, with its
compile set and trl patched as tests/unsloth_cpu.py does it, and the harnesses' runs start there: Unsloth
reads its compile setting once, on import, so each setting has a server of its own. Every run has the
server's environment (conftest.SCRIPT_ENV over the test's), which was in effect when those libraries read
theirs, and only what a command adds that is read later (a folder's path).

The server answers each command with "started PID" and each end with "ended PID CODE"; ForkServer below
is the tests' side.
"""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading

PRELOAD = ("torch", "transformers", "datasets", "peft", "accelerate", "trl", "matplotlib")


def preload(unsloth=None, unpatched=False):
    import importlib

    if unsloth:
        import contextlib

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import unsloth_cpu  # noqa: E402  (it puts the repo on sys.path)
        from grpo_math import compiling

        with contextlib.redirect_stdout(sys.stderr):  # stdout answers the tests
            compiling.set_compile(unsloth)
            unsloth_cpu.import_unsloth(patch_trl=not unpatched)
        return
    for name in PRELOAD:
        importlib.import_module(name)
    from peft import LoraConfig, PeftModel, get_peft_model  # noqa: F401  (the lazy parts a run imports)
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401


def run_in_child(command):
    """In the forked child: the command's folder and files, then the script as ``python SCRIPT FLAGS`` runs
    it. Its end, an exception or a KeyboardInterrupt included, ends the interpreter as it would end that."""
    import runpy

    os.setpgid(0, 0)  # a process group of its own, as the server's children are killed by group
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(command["cwd"])
    os.environ.update(command["env"])
    for fd, path in ((0, os.devnull), (1, command["stdout"]), (2, command["stderr"])):
        f = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    argv = command["argv"]
    if argv[0] == "-m":  # python -m MODULE FLAGS
        sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)


def serve():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--unsloth", choices=["off", "on"])
    p.add_argument("--unpatched", action="store_true")
    a = p.parse_args()
    preload(a.unsloth, a.unpatched)
    print("ready", flush=True)
    children = set()
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.05)
        if readable:
            line = sys.stdin.readline()
            if not line:  # the tests ended: no run outlives them
                for pid in children:
                    os.killpg(pid, signal.SIGKILL)
                return
            command = json.loads(line)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                run_in_child(command)
            children.add(pid)
            print(f"started {pid}", flush=True)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            print(f"ended {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


class ForkServer:
    """The tests' side: ``run(argv, out_dir)`` starts a run and returns a ForkedRun."""

    def __init__(self, env, cwd, *options):
        self.cwd = cwd
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *options], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
        assert self.proc.stdout.readline().strip() == "ready", "tests/forks.py did not start"
        self.outputs, self.runs = tempfile.TemporaryDirectory(), 0  # each run's stdout and stderr
        self.waiting = []  # one list per command sent, in order: its pid goes there
        self.ended = {}  # pid -> exit code
        self.gone = False  # the server ended: nothing more starts or ends
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            word, pid, *code = line.split()
            with self.changed:
                if word == "started":
                    self.waiting.pop(0).append(int(pid))
                else:
                    self.ended[int(pid)] = int(code[0])
                self.changed.notify_all()
        with self.changed:
            self.gone = True
            self.changed.notify_all()

    def run(self, argv, cwd=None, env=None):
        """Start ``python ARGV`` (a script's path or "-m MODULE", then its flags), in the server's folder or CWD,
        with ENV's variables added."""
        self.runs += 1
        out = os.path.join(self.outputs.name, str(self.runs))
        command = {"argv": [str(a) for a in argv], "cwd": str(cwd or self.cwd), "env": env or {},
                   "stdout": out + ".out", "stderr": out + ".err"}
        slot = []
        with self.changed:
            self.waiting.append(slot)
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
            assert self.changed.wait_for(lambda: slot or self.gone, timeout=60), "tests/forks.py is stuck"
        assert slot, "tests/forks.py ended"
        return ForkedRun(self, slot[0], argv, command)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.outputs.cleanup()


class ForkedRun:
    """One run: ``pid``, ``wait(timeout)`` -> its exit code, and ``result()`` as subprocess.run gives it."""

    def __init__(self, server, pid, argv, command):
        self.server, self.pid, self.args, self.command = server, pid, argv, command

    def wait(self, timeout=600):
        with self.server.changed:
            self.server.changed.wait_for(lambda: self.pid in self.server.ended or self.server.gone, timeout=timeout)
            if self.pid in self.server.ended:
                return self.server.ended[self.pid]
            if self.server.gone:
                raise AssertionError(f"tests/forks.py ended before {self.args}")
        os.killpg(self.pid, signal.SIGKILL)
        raise subprocess.TimeoutExpired(self.args, timeout)

    def result(self, timeout=600):
        code = self.wait(timeout)
        with open(self.command["stdout"], errors="replace") as out, open(self.command["stderr"], errors="replace") as err:
            return subprocess.CompletedProcess(self.args, code, out.read(), err.read())


if __name__ == "__main__":
    serve()
