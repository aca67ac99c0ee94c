"""llama.cpp's own tools, for the GGUF exports: its converter, llama-quantize and its runtime, at one
pinned version, offline once fetched.

    source()             the llama.cpp folder: LLAMA_CPP_DIR (or Unsloth's UNSLOTH_LLAMA_CPP_PATH) where set,
                         else the cache, filled once from the pinned llama-cpp-python sdist (fetch)
    check_quants(spec)   "q4_k_m,q8_0" -> ["q4_k_m", "q8_0"], or ValueError naming the choices
    convert(hf, out, t)  convert_hf_to_gguf.py: a transformers folder -> one GGUF file (f16, bf16 or q8_0)
    quantize(f16, out, q)  llama-quantize, built on first use (build) and cached: the k-quants (q4_k_m...)
    load(path)           the GGUF in llama.cpp's runtime (llama-cpp-python's bindings over the same build)

Why the sdist of llama-cpp-python: it vendors llama.cpp at one commit (LLAMA_CPP_COMMIT), with
convert_hf_to_gguf.py and the gguf-py it needs, and the Python bindings of that same commit. One
`pip download` (76 MB, checked against SDIST_SHA256) fetches it into the cache; nothing after that
needs a network. f16, bf16 and q8_0 come from the converter alone, in Python. A k-quant needs
llama-quantize, a C++ build: the first export that asks for one builds it with cmake (BENCHMARKS.md,
"Sharing the model", gives the time) and every later one reuses it. `python -m grpo_math.llama_cpp build`
does it ahead of time.
"""

import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile

LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"  # what that sdist vendors
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_TYPES = ("f16", "bf16", "q8_0")  # convert_hf_to_gguf.py writes these itself
K_QUANTS = ("q2_k", "q3_k_m", "q4_0", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k")  # llama-quantize, from f16
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF"]
# On x86-64, AVX2 kernels rather than -march=native: built native on an Intel Xeon with AVX-512 and AMX, every
# quantized GGUF (q8_0, q4_k_m, q4_1) crashed the runtime (segmentation fault), and f16 did not; the AVX2 build
# runs them all, on Intel and AMD alike. llama-quantize's output does not depend on it.
if platform.machine().lower() in ("x86_64", "amd64"):
    CMAKE_FLAGS += ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                    "-DGGML_BMI2=ON"]


class LlamaCppMissing(RuntimeError):
    """llama.cpp is not in the cache and cannot be fetched, or a tool it needs cannot be built."""


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "grpo_math", f"llama-cpp-python-{LLAMA_CPP_PYTHON}")


def given_dir():
    """A llama.cpp folder the user named (LLAMA_CPP_DIR, or Unsloth's UNSLOTH_LLAMA_CPP_PATH), or None."""
    for name in ("LLAMA_CPP_DIR", "UNSLOTH_LLAMA_CPP_PATH"):
        if os.environ.get(name):
            path = os.environ[name]
            if not os.path.isfile(os.path.join(path, "convert_hf_to_gguf.py")):
                raise LlamaCppMissing(f"{name}={path} holds no convert_hf_to_gguf.py; point it at a llama.cpp "
                                      "source folder, or unset it to use the kit's pinned copy")
            return path
    return None


def source(fetch_if_missing=True):
    """The llama.cpp source folder the exports use; fetched into the cache the first time."""
    path = given_dir() or os.path.join(cache_dir(), "vendor", "llama.cpp")
    if not os.path.isfile(os.path.join(path, "convert_hf_to_gguf.py")):
        if not fetch_if_missing:
            raise LlamaCppMissing(f"llama.cpp is not in {cache_dir()}: python -m grpo_math.llama_cpp fetch")
        fetch()
    return path


def fetch():
    """Download the pinned llama-cpp-python sdist (checked against SDIST_SHA256) and unpack it into the
    cache: a new folder moved into place whole, so that a kill leaves nothing half-unpacked."""
    target = cache_dir()
    if os.path.isfile(os.path.join(target, "vendor", "llama.cpp", "convert_hf_to_gguf.py")):
        return target
    print(f"fetching llama.cpp {LLAMA_CPP_COMMIT[:7]} (the llama-cpp-python {LLAMA_CPP_PYTHON} sdist, 76 MB) "
          f"into {target}, once")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        pinned = os.path.join(tmp, "requirement.txt")
        with open(pinned, "w") as f:
            f.write(f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n")
        # Only llama-cpp-python as its sdist: pip prepares its metadata in an environment of its build
        # requirements, and those come as wheels. Under --no-binary :all: they were built from source too: a
        # fetch took 83 s on a 2-core CPU, against 19 s now (BENCHMARKS.md, "Test suite").
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                               "llama-cpp-python", "--require-hashes", "-r", pinned, "-d", tmp],
                              capture_output=True, text=True)
        sdists = glob.glob(os.path.join(tmp, "llama_cpp_python-*.tar.gz"))
        if proc.returncode or not sdists:
            raise LlamaCppMissing(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist (pip: "
                                  f"{proc.stderr.strip().splitlines()[-1:] or proc.returncode}). With no package "
                                  "index at hand, set LLAMA_CPP_DIR to a llama.cpp source folder")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp, filter="tar")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(os.path.join(tmp, f"llama_cpp_python-{LLAMA_CPP_PYTHON}"), target)
    return target


def check_quants(spec, flag="--gguf"):
    """The GGUF types a --save-gguf/--gguf value asks for, lower case, in order; ValueError for another."""
    quants = [q.strip().lower() for q in str(spec).split(",") if q.strip()]
    unknown = [q for q in quants if q not in CONVERTER_TYPES + K_QUANTS]
    if not quants or unknown:
        raise ValueError(f"{flag} {', '.join(unknown) or repr(spec)} is not a GGUF type the kit makes; choose one or more, "
                         f"comma-separated, of: {', '.join(CONVERTER_TYPES + K_QUANTS)}")
    return list(dict.fromkeys(quants))


def file_name(quant):
    """model-Q4_K_M.gguf: the quantization in the name, as Ollama's hf.co/REPO:Q4_K_M picks a file."""
    return f"model-{quant.upper()}.gguf"


def _run(command, what, env=None, log=None):
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if log:
        with open(log, "w") as f:
            f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


def convert(hf_dir, out_file, outtype="f16"):
    """llama.cpp's convert_hf_to_gguf.py on a transformers folder (RUN/merged): one GGUF file."""
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"the converter writes {', '.join(CONVERTER_TYPES)}; {outtype} needs quantize()")
    converter = os.path.join(source(), "convert_hf_to_gguf.py")
    _run([sys.executable, converter, hf_dir, "--outtype", outtype, "--outfile", out_file + ".part"],
         f"llama.cpp's convert_hf_to_gguf.py ({outtype})")
    os.replace(out_file + ".part", out_file)  # whole or absent: a kill mid-write leaves only the .part
    return out_file


def build_dir():
    """Where build() builds: named after its flags, so that other flags build afresh."""
    flags = hashlib.sha256(" ".join(CMAKE_FLAGS).encode()).hexdigest()[:8]
    return os.path.join(given_dir() or cache_dir(), f"build-grpo-math-{flags}")


def quantize_binary():
    return os.path.join(build_dir(), "bin", "llama-quantize")


def build():
    """Build llama-quantize and the shared libraries the runtime loads, once; the path of llama-quantize."""
    binary = quantize_binary()
    if os.path.isfile(binary):
        return binary
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise LlamaCppMissing(f"building llama-quantize needs {' and '.join(missing)} (Debian/Ubuntu: apt install "
                              "cmake build-essential); or export f16, bf16 or q8_0, which need no build")
    src, jobs = source(), str(os.cpu_count() or 2)
    print(f"building llama.cpp's llama-quantize once, with cmake on {jobs} cores (minutes; BENCHMARKS.md gives the "
          f"time), into {build_dir()}")
    log = os.path.join(os.path.dirname(build_dir()), "build-grpo-math.log")
    _run(["cmake", "-S", src, "-B", build_dir(), *CMAKE_FLAGS], "cmake (configure)", log=log)
    _run(["cmake", "--build", build_dir(), "--target", "llama-quantize", "-j", jobs], "cmake --build", log=log)
    return binary


def quantize(f16_file, out_file, quant):
    """llama-quantize: an f16 GGUF -> ``quant`` (q4_k_m...)."""
    _run([build(), f16_file, out_file + ".part", quant.upper(), str(os.cpu_count() or 2)], f"llama-quantize ({quant})")
    os.replace(out_file + ".part", out_file)
    return out_file


def write_ggufs(hf_dir, out_dir, quants):
    """Every GGUF type in ``quants`` from the transformers folder ``hf_dir``, into ``out_dir``; the paths.
    A k-quant is made from an f16 file, which is kept only where f16 was asked for."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {q: os.path.join(out_dir, file_name(q)) for q in quants}
    for q in quants:
        if q in CONVERTER_TYPES:
            convert(hf_dir, paths[q], q)
    k_quants = [q for q in quants if q in K_QUANTS]
    if k_quants:
        f16 = paths.get("f16") or os.path.join(out_dir, "intermediate-F16.gguf")
        if not os.path.isfile(f16):
            convert(hf_dir, f16, "f16")
        for q in k_quants:
            quantize(f16, paths[q], q)
        if "f16" not in quants:
            os.remove(f16)
    return [paths[q] for q in quants]


def bindings_dir():
    """The Python bindings (llama-cpp-python's llama_cpp/) of the cached sdist: the same commit as the build."""
    return os.path.join(cache_dir(), "llama_cpp")


def runtime_available():
    """True when llama.cpp's runtime can load a GGUF: llama-cpp-python installed, or the kit's build with
    the cached sdist's bindings."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        return True
    built = os.path.isfile(os.path.join(build_dir(), "bin", "libllama.so"))
    return built and not given_dir() and os.path.isfile(os.path.join(bindings_dir(), "__init__.py"))


def load(gguf_file, n_ctx=2048):
    """A llama_cpp.Llama over ``gguf_file``: an installed llama-cpp-python, else the cached sdist's bindings
    over the kit's build (the shared libraries build() made beside llama-quantize)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", os.path.join(build_dir(), "bin"))
        spec = importlib.util.spec_from_file_location("llama_cpp", os.path.join(bindings_dir(), "__init__.py"),
                                                      submodule_search_locations=[bindings_dir()])
        module = importlib.util.module_from_spec(spec)
        sys.modules["llama_cpp"] = module
        spec.loader.exec_module(module)
    from llama_cpp import Llama

    return Llama(gguf_file, n_ctx=n_ctx, n_threads=os.cpu_count() or 2, seed=0, verbose=False)


if __name__ == "__main__":
    usage = "python -m grpo_math.llama_cpp fetch|build: fetch the pinned llama.cpp, or also build llama-quantize"
    if sys.argv[1:] not in (["fetch"], ["build"]):
        raise SystemExit(usage)
    print(fetch() if sys.argv[1] == "fetch" else build())
