"""Why the notebook install goes without vLLM (README, "Colab, Kaggle and older drivers"), read from
the packages' own metadata on the package index: no vLLM wheel there both runs on a notebook's CUDA
12 driver and lies in the range trl supports.

A vLLM wheel pins one torch (`Requires-Dist: torch==X`), and PyPI's torch wheel of each version is
built for one CUDA, which its own requirements name (`nvidia-cuda-runtime-cu12`, or
`cuda-toolkit==13...`). The metadata comes from the `.metadata` file the index serves beside each
wheel (PEP 658), a few kB, or where there is none, from the wheel's own METADATA, read by range
requests (under 1 MB). `pip install --dry-run` downloads every wheel it weighs from an index that does
not advertise those files: 902 MB for torch 2.9.1 alone, measured here.

The tests read a snapshot of that metadata, committed beside this file (SNAPSHOT): the versions each
project has wheels for and the Requires-Dist lines of each wheel the verdicts read. So an outage of the
index, or a release made after the snapshot, never fails a test of the kit. To read the index again
(PIP_INDEX_URL, else PyPI), run the same checks on it and write a new snapshot:

    python tests/test_notebook_vllm.py --refresh

then run these tests: a verdict that no longer holds fails them, and the README must say what changed."""

import email.parser
import functools
import importlib.metadata
import io
import json
import os
import re
import sys
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from conftest import ROOT

INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
SNAPSHOT = os.path.join(ROOT, "tests", "index_snapshot.json")
LIVE = {}  # set by --refresh: the live index is read, and what it answered is recorded here
# A notebook: Linux x86_64 and Python 3.12 (Kaggle; Colab's runtime 2026.07) or 3.13 (Colab now).
NOTEBOOK = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "python_version": "3.12", "extra": ""}
# What the README states, checked below against the index.
NEWEST_CUDA12_VLLM, ITS_TORCH = "0.19.1", "2.10.0"


def pins():
    """requirements.txt's `name==version` pins."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        return dict(re.findall(r"^([\w-]+)==([\w.]+)", f.read(), re.M))


def fetch(url, accept="*/*"):
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


@functools.lru_cache(maxsize=None)
def live_wheels(name):
    """{version: url} of the project's Linux x86_64 wheels on the index, yanked ones left out; of a
    version with several builds (vllm 0.23.0 and 0.23.0-2), the newest build."""
    page = f"{INDEX}/{canonicalize_name(name)}/"
    body = fetch(page, "application/vnd.pypi.simple.v1+json, text/html;q=0.1")
    if body.lstrip().startswith("{"):
        files = [(f["filename"], f["url"]) for f in json.loads(body)["files"] if not f.get("yanked")]
    else:  # an index that only serves the HTML form
        files = [(text, re.search(r'href="([^"#]+)', attrs)[1]) for attrs, text in
                 re.findall(r"<a([^>]*)>([^<]+)</a>", body) if "data-yanked" not in attrs]
    found = {}
    for filename, url in files:
        if filename.endswith(".whl") and re.search(r"manylinux.*x86_64\.whl$|-none-any\.whl$", filename):
            _, version, build, tags = parse_wheel_filename(filename)
            if {t.interpreter for t in tags} & {"cp312", "cp38", "py3"}:
                found[version] = max(found.get(version, ((), "")), (build, urllib.request.urljoin(page, url)))
    return {version: url for version, (_, url) in found.items()}


class RemoteWheel(io.RawIOBase):
    """A wheel on the index read by HTTP range requests, for an index that serves no .metadata file
    beside it: zipfile reads the archive's directory and the one member asked for."""

    def __init__(self, url):
        super().__init__()
        self.url, self.pos, self.received = url, 0, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as response:
            self.size = int(response.headers["Content-Length"])

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = (offset, self.pos + offset, self.size + offset)[whence]
        return self.pos

    def readinto(self, buffer):
        end = min(self.pos + len(buffer), self.size)
        if end <= self.pos:
            return 0
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
        assert response.status == 206 and len(data) == end - self.pos, f"{self.url}: no range requests"
        buffer[:len(data)] = data
        self.pos += len(data)
        self.received += len(data)
        return len(data)


def wheel_metadata(url):
    """A wheel's METADATA: the .metadata file beside it (PEP 658), else read out of the wheel."""
    try:
        return fetch(url + ".metadata")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
    with zipfile.ZipFile(RemoteWheel(url)) as wheel:
        (member,) = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        return wheel.read(member).decode()


@functools.lru_cache(maxsize=None)
def snapshot():
    with open(SNAPSHOT) as f:
        return json.load(f)


def releases(name):
    """The versions the project has a Linux x86_64 wheel for: the snapshot's, or the live index's under --refresh."""
    if LIVE:
        LIVE["wheels"][name] = sorted(map(str, live_wheels(name)), key=Version)
        return [Version(v) for v in LIVE["wheels"][name]]
    return [Version(v) for v in snapshot()["wheels"][name]]


@functools.lru_cache(maxsize=None)
def requires(name, version):
    """The Requires-Dist lines that apply in a notebook, from the wheel's metadata (the snapshot's copy)."""
    key = f"{name}=={version}"
    if LIVE:
        metadata = email.parser.Parser().parsestr(wheel_metadata(live_wheels(name)[Version(version)]))
        LIVE["requires"][key] = lines = metadata.get_all("Requires-Dist") or []
    else:
        lines = snapshot()["requires"].get(key)
        assert lines is not None, f"{SNAPSHOT} holds no metadata for {key}: run this file with --refresh"
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(NOTEBOOK)]


def pinned(name, version, dependency):
    """The exact version `name version` pins `dependency` to (vllm pins torch with ==)."""
    (spec,) = [str(r.specifier) for r in requires(name, version) if r.name == dependency]
    assert spec.startswith("=="), f"{name} {version} asks for {dependency}{spec}, not one version"
    return spec[2:]


def torch_cuda(version):
    """The CUDA major version PyPI's torch `version` is built for, from the CUDA packages it requires."""
    majors = set()
    for r in requires("torch", version):
        if m := re.fullmatch(r"nvidia-[\w-]+-cu(\d+)", r.name):
            majors.add(int(m[1]))
        elif r.name in ("cuda-toolkit", "cuda-runtime"):
            majors.add(Version(next(iter(r.specifier)).version).major)
    assert len(majors) == 1, f"torch {version}: no single CUDA in its requirements ({majors})"
    return majors.pop()


def trl_vllm_range():
    """The vLLM versions the installed trl supports: its `vllm` extra."""
    for line in importlib.metadata.requires("trl"):
        r = Requirement(line)
        if r.name == "vllm" and r.marker is not None and r.marker.evaluate({"extra": "vllm"}):
            return r.specifier
    raise AssertionError("trl declares no vllm extra")


def vllm_release_list():
    """vLLM's released versions with a Linux x86_64 wheel on the index (the snapshot's, or the live index's)."""
    return sorted(v for v in releases("vllm") if not v.is_prerelease)


@pytest.fixture(scope="module")
def vllm_releases():
    return vllm_release_list()


def test_the_snapshot_is_of_the_index_the_readme_cites():
    taken = snapshot()
    assert taken["index"] == "https://pypi.org/simple" and re.fullmatch(r"\d{4}-\d{2}-\d{2}", taken["taken"])
    assert taken["wheels"]["vllm"] and taken["requires"]


def test_the_installed_trl_is_the_pinned_one_and_supports_vllm_0_20_to_0_30():
    """The README's range is trl 1.14's; a new trl pin must re-open the question."""
    assert importlib.metadata.version("trl") == pins()["trl"]
    assert trl_vllm_range() == Requirement("vllm>=0.20.0,<=0.30.0").specifier


def test_every_vllm_trl_supports_needs_a_cuda_13_torch(vllm_releases):
    """The verdict itself: a release in trl's range whose torch is a CUDA 12 build would be one a
    notebook's driver can run, and the README would have to offer it."""
    supported = [v for v in vllm_releases if v in trl_vllm_range()]
    assert len(supported) >= 10, f"too few vLLM releases in trl's range on {INDEX}: {supported}"
    with ThreadPoolExecutor(8) as pool:
        torches = dict(zip(supported, pool.map(lambda v: pinned("vllm", str(v), "torch"), supported)))
        pinned_torches = sorted(set(torches.values()))
        cuda = dict(zip(pinned_torches, pool.map(torch_cuda, pinned_torches)))
    runs_on_cuda12 = {str(v): t for v, t in torches.items() if cuda[t] != 13}
    assert not runs_on_cuda12, f"vLLM releases in trl's range whose torch is not a CUDA 13 build: {runs_on_cuda12}"
    assert pinned_torches == ["2.11.0", "2.13.0"], torches  # the two the README names


def test_the_newest_cuda_12_vllm_is_0_19_1_below_trls_range(vllm_releases):
    """The nearest miss the README names: vllm 0.19.1 pins torch 2.10.0, a CUDA 12.8 build, and fits
    the kit's transformers and Unsloth's torch range, but trl 1.14 does not support it."""
    newest = next(v for v in reversed(vllm_releases) if torch_cuda(pinned("vllm", str(v), "torch")) == 12)
    assert (str(newest), pinned("vllm", str(newest), "torch")) == (NEWEST_CUDA12_VLLM, ITS_TORCH)
    assert newest not in trl_vllm_range()
    assert "nvidia-cuda-runtime-cu12" in {r.name for r in requires("torch", ITS_TORCH)}
    kit = pins()
    (transformers,) = [r for r in requires("vllm", NEWEST_CUDA12_VLLM) if r.name == "transformers"]
    assert kit["transformers"] in transformers.specifier
    for package in ("unsloth", "unsloth_zoo"):
        (torch,) = [r for r in requires(package, kit[package]) if r.name == "torch"]
        assert ITS_TORCH in torch.specifier, f"{package} {kit[package]} asks for torch{torch.specifier}"


def refresh():
    """Read the index again, run the verdicts on what it answers, and write what they read as SNAPSHOT."""
    import datetime
    import traceback

    LIVE.update(wheels={}, requires={})
    verdicts = [test_every_vllm_trl_supports_needs_a_cuda_13_torch,
                test_the_newest_cuda_12_vllm_is_0_19_1_below_trls_range]
    failed = 0
    for check in verdicts:
        try:
            check(vllm_release_list())
        except AssertionError:
            failed += 1
            print(f"{check.__name__} no longer holds on {INDEX}:\n{traceback.format_exc(limit=1)}")
    taken = {"index": INDEX, "taken": datetime.date.today().isoformat(), "wheels": LIVE["wheels"],
             "requires": dict(sorted(LIVE["requires"].items()))}
    with open(SNAPSHOT + ".part", "w") as f:
        json.dump(taken, f, indent=1)
        f.write("\n")
    os.replace(SNAPSHOT + ".part", SNAPSHOT)
    print(f"{SNAPSHOT}: {len(taken['requires'])} wheels' requirements from {INDEX}, {taken['taken']}; "
          f"{failed} of {len(verdicts)} verdicts changed (README, 'Colab, Kaggle and older drivers')")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--refresh"]:
        raise SystemExit("usage: python tests/test_notebook_vllm.py --refresh  (reads the package index again)")
    raise SystemExit(refresh())
