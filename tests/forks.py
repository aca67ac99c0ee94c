"""Script runs as processes forked from one that has already imported torch, transformers, trl, peft and
datasets: each run skips the 7-8 s those imports cost a fresh interpreter, which is most of a smoke run.

    python tests/forks.py --socket PATH [--unsloth off|on [--unpatched]]   # a server
    python tests/forks.py --client SCRIPT FLAGS    # a launcher or its worker: FORKS_SOCKET names the server

Each run is a process of its own, as ``python SCRIPT FLAGS`` would be: its own exit code (a negative one
for a signal, as subprocess gives it), its own output, and a kill or a Ctrl-C reaches it alone. What
differs from a fresh interpreter is only that those libraries were imported before the script ran; so the
tests of the import order itself (tests/test_hardware.py) start fresh interpreters. Every run has the
server's environment (conftest.SCRIPT_ENV over the test's), which was in effect when those libraries read
theirs, and what its command adds that is read later (a folder's path, torchrun's ranks).

With --unsloth the server imported Unsloth instead, with its compile off or on, and patched trl (or not)
as tests/unsloth_cpu.py does it, for that harness's runs and tests/unsloth_tools_cpu.py's: Unsloth reads
its compile setting once, on import, so each setting has a server of its own.

A run starts in one of two ways:
- a command on the server's stdin, from ForkServer.run below: the server answers "started PID", and
  "ended PID CODE" when it ends; its output goes to files;
- a client, for a launcher that starts its workers as processes of its own (torchrun, accelerate launch,
  a kernel manager, bench/gpu_check.py): the launcher starts ``CLIENT + [SCRIPT, FLAGS]``, and the
  server forks the run in the client's folder and environment, writing to the client's stdout and
  stderr. A signal to the client reaches the run, and the client ends as the run ends, with its exit
  code or by its signal; a client killed outright takes its run with it. launches_forked() makes
  subprocess.Popen start Python runs that way.
"""

import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading

CLIENT = [os.path.abspath(__file__), "--client"]  # the script a launcher starts, before the run's own script
# matplotlib.pyplot picks its backend at its first figure, not on import: a run still picks its own.
PRELOAD = ("torch", "transformers", "datasets", "peft", "accelerate", "trl", "matplotlib.pyplot",
           "matplotlib.backends.backend_agg")


def preload(unsloth=None, unpatched=False):
    """The imports every run would make, then every object they made frozen out of the garbage collector
    (gc.freeze): a collection in a run walks only what the run made. Otherwise each full collection, such as
    the one the Trainer makes at the end of training (accelerate's free_memory), writes to every page the
    imports filled, copying them from the server one by one: 0.4 s a collection on this CPU, measured."""
    import gc
    import importlib

    if unsloth:
        import contextlib

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import unsloth_cpu  # noqa: E402  (it puts the repo on sys.path)
        from grpo_math import compiling

        with contextlib.redirect_stdout(sys.stderr):  # stdout answers the tests
            compiling.set_compile(unsloth)
            unsloth_cpu.import_unsloth(patch_trl=not unpatched)
    else:
        from peft import LoraConfig, PeftModel, get_peft_model  # noqa: F401  (the lazy parts a run imports)
        from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def launches_forked(server_socket):
    """subprocess.Popen, made to start ``[sys.executable, SCRIPT or "-m", ...]`` as a client of the server at
    SERVER_SOCKET: for code under test that starts its runs as processes (bench/gpu_check.py's parts, the
    learning study's runs). Every other command starts as it would."""
    base = subprocess.Popen

    class ForkedPopen(base):
        def __init__(self, args, *rest, env=None, **kwargs):
            if (isinstance(args, (list, tuple)) and len(args) > 1 and args[0] == sys.executable
                    and (args[1] == "-m" or str(args[1]).endswith(".py"))):
                args = [sys.executable, *CLIENT, *args[1:]]
                env = {**(os.environ if env is None else env), "FORKS_SOCKET": server_socket}
            super().__init__(args, *rest, env=env, **kwargs)

    return ForkedPopen


def run_in_child(command, fds=None, inherited=()):
    """In the forked child: the command's folder and files (or a client's ``fds``: its stdin, stdout and
    stderr), then the script as ``python SCRIPT FLAGS`` runs it. Its end, an exception or a KeyboardInterrupt
    included, ends the interpreter as it would end that."""
    import runpy

    for f in inherited:  # the server's sockets
        f.close()
    os.setpgid(0, 0)  # a process group of its own, as the server's children are killed by group
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(command["cwd"])
    os.environ.update(command["env"])
    if fds is None:
        fds = [os.open(os.devnull, os.O_RDONLY)] + [os.open(command[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                                                    for name in ("stdout", "stderr")]
    for fd, f in enumerate(fds):
        os.dup2(f, fd)
        os.close(f)
    if os.environ.get("PYTHONUNBUFFERED"):  # as a fresh interpreter reads it (torchrun's workers: python -u)
        sys.stdout.reconfigure(write_through=True)
    if command.get("launches_forked"):
        subprocess.Popen = launches_forked(command["launches_forked"])
    argv = command["argv"]
    if argv[0] == "-m":  # python -m MODULE FLAGS
        sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)


def kill(pid, sig, group=False):
    """SIG to a run (with ``group``, to its process group, which it makes first thing), if it is still there."""
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:  # it ended, or has not made its group yet
        if group:
            kill(pid, sig)


def serve():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True, help="where clients connect")
    p.add_argument("--unsloth", choices=["off", "on"])
    p.add_argument("--unpatched", action="store_true")
    a = p.parse_args()
    preload(a.unsloth, a.unpatched)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(a.socket)
    listener.listen(64)
    print("ready", flush=True)
    children, clients = {}, {}  # pid -> its client's connection (None: a command from stdin); connection -> pid
    while True:
        for source in select.select([sys.stdin, listener, *clients], [], [], 0.05)[0]:
            fds = None
            if source is sys.stdin:  # one command at a time: ForkServer.run waits for its "started"
                line = sys.stdin.readline()
                if not line:  # the tests ended: no run outlives them
                    for pid in children:
                        kill(pid, signal.SIGKILL, group=True)
                    return
                command, connection = json.loads(line), None
            elif source is listener:
                connection, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
                command = json.loads(message)
            else:  # a client's signal for its run, or the client's end
                message, pid = source.recv(64), clients[source]
                if message:
                    kill(pid, int(message))
                    continue
                kill(pid, signal.SIGKILL, group=True)  # killed outright: so is its run, as a worker's would be
                children[pid] = None
                del clients[source]
                source.close()
                continue
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                run_in_child(command, fds, inherited=[listener, *clients, *filter(None, [connection])])
            for f in fds or ():
                os.close(f)
            children[pid] = connection
            if connection is None:
                print(f"started {pid}", flush=True)
            else:
                clients[connection] = pid
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            code, connection = os.waitstatus_to_exitcode(status), children.pop(pid)
            if connection is None:
                print(f"ended {pid} {code}", flush=True)
            elif connection in clients:
                connection.send(str(code).encode())
                del clients[connection]
                connection.close()


def client():
    """``python tests/forks.py --client SCRIPT FLAGS``: the run, forked by the server at FORKS_SOCKET (module
    docstring); this process passes it signals and ends as it ends."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.connect(os.environ["FORKS_SOCKET"])
    command = {"argv": sys.argv[2:], "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(connection, [json.dumps(command).encode()], [0, 1, 2])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda number, _: connection.send(str(number).encode()))
    code = connection.recv(64)
    if not code:
        sys.exit("tests/forks.py: the server ended before the run")
    code = int(code)
    if code < 0:  # ended by a signal: so does this process
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


class ForkServer:
    """The tests' side: ``run(argv)`` starts a run and returns a ForkedRun; a launcher's workers started as
    ``CLIENT + [SCRIPT, FLAGS]`` with ``FORKS_SOCKET=server.socket`` are forked by it too."""

    def __init__(self, env, cwd, *options):
        self.cwd = cwd
        self.outputs, self.runs = tempfile.TemporaryDirectory(), 0  # each run's stdout and stderr; the socket
        self.socket = os.path.join(self.outputs.name, "socket")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--socket", self.socket, *options],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
        assert self.proc.stdout.readline().strip() == "ready", "tests/forks.py did not start"
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

    def run(self, argv, cwd=None, env=None, launches_forked=False):
        """Start ``python ARGV`` (a script's path or "-m MODULE", then its flags), in the server's folder or CWD,
        with ENV's variables added; with ``launches_forked``, the Python runs it starts are forked too
        (launches_forked() above)."""
        self.runs += 1
        out = os.path.join(self.outputs.name, str(self.runs))
        command = {"argv": [str(a) for a in argv], "cwd": str(cwd or self.cwd), "env": env or {},
                   "stdout": out + ".out", "stderr": out + ".err",
                   "launches_forked": self.socket if launches_forked else None}
        slot = []
        with self.changed:
            self.waiting.append(slot)
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
            assert self.changed.wait_for(lambda: slot or self.gone, timeout=60), "tests/forks.py is stuck"
        assert slot, "tests/forks.py ended"
        return ForkedRun(self, slot[0], argv, command)

    def popen(self):
        """subprocess.Popen for code under test whose Python runs this server is to fork (launches_forked)."""
        return launches_forked(self.socket)

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
        out, err = (pathlib.Path(self.command[name]).read_text(errors="replace") for name in ("stdout", "stderr"))
        return subprocess.CompletedProcess(self.args, code, out, err)


if __name__ == "__main__":
    client() if sys.argv[1:2] == ["--client"] else serve()
