"""A stand-in for the Hugging Face Hub on 127.0.0.1, for the tests of grpo_math/push.py and of --push-to-hub.

The real huggingface_hub client talks to it through HF_ENDPOINT. It answers what the client's upload
path asks, as the Hub does, and keeps what arrives:

    HEAD /                                          any answer will do: grpo_math.hub's reachability check
    GET  /api/whoami-v2                             the user, their orgs and the token's role
    POST /api/repos/create                          a new repo; 409 when it exists (create_repo's exist_ok)
    GET  /api/models/NS/NAME                        the repo's info, or 404 RepoNotFound
    POST /api/validate-yaml                         a README.md's metadata: accepted
    POST /api/models/NS/NAME/preupload/main         per file: "lfs" for binary files, "regular" for text
    POST /NS/NAME.git/info/lfs/objects/batch        the LFS batch: transfer "basic", an upload and a verify
                                                    address per object not stored yet
    PUT  /lfs/OID, POST /lfs/OID/verify             the object's bytes, checked against its sha256
    POST /api/models/NS/NAME/commit/main            ndjson: regular files inline (base64), LFS files by oid

The client uploads through Xet where hf_xet is installed; the fixture switches that off
(HF_HUB_DISABLE_XET), so that its files take the LFS "basic" transfer, which this server speaks.

Use it as a fixture, ``from hub_server import hub``; the test gets a Hub with
    .url, .token, .user        the endpoint, the one token it accepts (set as HF_TOKEN), its user
    .repos                     {repo_id: {path: bytes}}: what the commits brought; .private {repo_id: bool}
    .requests                  ["METHOD /path", ...] in the order they came
and the switches, set before the client asks:
    .role = "read"             the token may read only: whoami says so, and writes get 403
    .role = "fineGrained", .fine_grained = {...}   whoami shows these fine-grained permissions
    .fail_commit = True        the commit answers 500 (a repo id instead: only that repo's commits)
A token other than .token gets 401.
"""

import base64
import hashlib
import json
import re

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Response

USER, ORG = "alice", "kit-org"
TOKEN = "hf_stand_in_write_token"
BINARY_SUFFIXES = (".safetensors", ".gguf", ".png", ".bin", ".pt")  # the Hub's .gitattributes sends these to LFS
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [  # (method, path pattern, Hub method name)
    ("HEAD", r"/", "_root"), ("GET", r"/", "_root"),
    ("GET", r"/api/whoami-v2", "_whoami"),
    ("POST", r"/api/repos/create", "_create"),
    ("GET", rf"/api/models/{REPO}(/revision/main)?", "_info"),
    ("POST", r"/api/validate-yaml", "_validate_yaml"),
    ("POST", rf"/api/models/{REPO}/preupload/main", "_preupload"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "_lfs_batch"),
    ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", "_lfs_put"),
    ("POST", r"/lfs/(?P<oid>[0-9a-f]{64})/verify", "_lfs_verify"),
    ("POST", rf"/api/models/{REPO}/commit/main", "_commit"),
]


def answer(body=None, status=200, error_code=None):
    """A JSON response; an error carries its message and code in the headers, where the client reads them."""
    headers = {}
    if status >= 400:
        headers["X-Error-Message"] = str(body)
        body = {"error": body}
        if error_code:
            headers["X-Error-Code"] = error_code
    return Response(json.dumps(body), status=status, headers=headers, content_type="application/json")


class Hub(HTTPServer):
    """The server and what it holds. One per test: the fixture starts it on a free port and stops it."""

    def __init__(self):
        super().__init__(host="127.0.0.1", port=0, threaded=True)  # the client uploads LFS files in parallel
        self.token, self.user, self.orgs = TOKEN, USER, [ORG]
        self.role, self.fine_grained, self.fail_commit = "write", None, False
        self.repos, self.private, self.lfs, self.requests = {}, {}, {}, []
        self.expect_request(re.compile(".*")).respond_with_handler(self.route)

    def thread_target(self):
        self.server.serve_forever(poll_interval=0.05)  # so that stop() returns at once, not after half a second

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def route(self, request):
        self.requests.append(f"{request.method} {request.path}")
        for method, pattern, name in ROUTES:
            match = re.fullmatch(pattern, request.path)
            if match and request.method == method:
                refused = None if name in ("_root", "_lfs_put", "_lfs_verify") else self._refused(request, name)
                return refused or getattr(self, name)(request, **match.groupdict())
        return answer(f"the stand-in Hub does not serve {request.method} {request.path}", 404)

    def _refused(self, request, name):
        """401 for a token other than .token; 403 for a write with a read token."""
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return answer("Invalid credentials in Authorization header", 401)
        if self.role == "read" and request.method == "POST" and name != "_validate_yaml":
            return answer("You don't have the rights to write with this token", 403)
        return None

    def _root(self, request):
        return Response("", status=200)

    def _whoami(self, request):
        token = {"displayName": "stand-in", "role": self.role}
        if self.role == "fineGrained" and self.fine_grained is not None:
            token["fineGrained"] = self.fine_grained
        return answer({"type": "user", "name": self.user, "orgs": [{"name": o, "type": "org"} for o in self.orgs],
                       "auth": {"type": "access_token", "accessToken": token}})

    def _create(self, request):
        body = request.get_json()
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        if repo_id in self.repos:  # the Hub's 409 names the repo's address too, which create_repo(exist_ok) returns
            conflict = answer("You already created this model repo", 409)
            conflict.set_data(json.dumps({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}))
            return conflict
        self.repos[repo_id], self.private[repo_id] = {}, body.get("visibility") == "private"
        return answer({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _info(self, request, repo):
        if repo not in self.repos:
            return answer("Repository not found", 404, "RepoNotFound")
        return answer({"id": repo, "private": self.private[repo], "sha": "0" * 40,
                       "siblings": [{"rfilename": path} for path in self.repos[repo]]})

    def _validate_yaml(self, request):
        return answer({"errors": [], "warnings": []})

    def _preupload(self, request, repo):
        if repo not in self.repos:
            return answer("Repository not found", 404, "RepoNotFound")
        files = []
        for f in request.get_json()["files"]:
            binary = f["path"].endswith(BINARY_SUFFIXES) or b"\0" in base64.b64decode(f["sample"])
            files.append({"path": f["path"], "uploadMode": "lfs" if binary else "regular", "shouldIgnore": False,
                          "oid": None})
        return answer({"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, request, repo):
        body = request.get_json()
        objects = []
        for obj in body["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:  # a stored object needs no upload: no actions
                item["actions"] = {"upload": {"href": f"{self.url}/lfs/{obj['oid']}", "header": {}},
                                   "verify": {"href": f"{self.url}/lfs/{obj['oid']}/verify", "header": {}}}
            objects.append(item)
        return Response(json.dumps({"transfer": "basic", "objects": objects}),
                        content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, request, oid):
        data = request.get_data()
        if hashlib.sha256(data).hexdigest() != oid:
            return answer("the bytes do not match the oid", 400)
        self.lfs[oid] = data
        return Response("", status=200)

    def _lfs_verify(self, request, oid):
        return answer({}) if oid in self.lfs else answer("object not uploaded", 404)

    def _commit(self, request, repo):
        if self.fail_commit is True or self.fail_commit == repo:
            return answer("Internal Error - the stand-in Hub fails this commit on purpose", 500)
        if repo not in self.repos:
            return answer("Repository not found", 404, "RepoNotFound")
        lines = [json.loads(line) for line in request.get_data().splitlines() if line.strip()]
        files = {}
        for line in lines[1:]:  # the first line is the header: summary and description
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return answer(f"LFS object {value['oid']} of {value['path']} was never uploaded", 422)
                files[value["path"]] = self.lfs[value["oid"]]
            else:
                return answer(f"the stand-in Hub does not take {line['key']} in a commit", 422)
        self.repos[repo].update(files)
        oid = hashlib.sha1(request.get_data()).hexdigest()
        return answer({"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})


@pytest.fixture
def hub(monkeypatch):
    """A running stand-in Hub, with HF_ENDPOINT and HF_TOKEN pointing at it, no offline mode, and Xet off
    (also for the scripts a test starts: they inherit the environment)."""
    from huggingface_hub import constants

    server = Hub()
    server.start()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", server.token)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read once, when huggingface_hub is imported
    try:
        yield server
        server.check_handler_errors()  # a bug in the stand-in fails the test, not only the client's request
    finally:
        server.stop()
