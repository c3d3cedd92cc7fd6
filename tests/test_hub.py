"""Publishing to and downloading from the Hub, against a local fake Hub; no network.

``FakeHub`` speaks the subset of the Hub HTTP API that ``huggingface_hub`` uses for
``create_repo``, ``create_branch``, ``upload_folder`` (README YAML validation, ``preupload``,
the NDJSON ``commit``; every file is answered "regular", so contents arrive base64 in the
commit and no LFS/Xet transfer happens) and ``hf_hub_download`` (``resolve``). It keeps every
branch's files, so what was pushed can be downloaded back.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
import yaml
from huggingface_hub import constants

import sae_lens_itda  # noqa: F401  (registers the architecture)
from sae_lens_itda import ITDA, AtomLabel
from sae_lens_itda.cli import main as cli_main
from sae_lens_itda.io.hub import find_dictionaries, load_from_hub, push_folder_to_hub, push_to_hub

REPO = "alice/itda-test"
TOKEN = "hf_test_token"


# --- a local fake Hub ------------------------------------------------------------------------


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.url = ""

    def oid(self, repo, branch) -> str:
        files = self.repos[repo]["branches"][branch]
        return hashlib.sha1(repr(sorted((p, hashlib.sha1(b).hexdigest()) for p, b in files.items())).encode()).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _reply(self, code, body=None, headers=None, raw=b""):
            data = json.dumps(body).encode() if body is not None else raw
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, code, error_code):
            self._reply(code, {"error": error_code}, {"X-Error-Code": error_code})

        def _start(self):
            url = urlsplit(self.path)
            hub.requests.append((self.command, url.path, self.headers.get("Authorization")))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            return url.path, parse_qs(url.query), body

        def do_POST(self):
            path, query, body = self._start()
            parts = path.split("/")
            if path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}"
                if repo in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                hub.repos[repo] = {"private": req.get("visibility") == "private", "branches": {"main": {}}, "create": req}
                return self._reply(200, {"url": f"{hub.url}/{repo}"})
            if path == "/api/validate-yaml":
                yaml.safe_load(json.loads(body)["content"].split("---")[1])  # must parse
                return self._reply(200, {"errors": [], "warnings": []})
            if len(parts) >= 6 and parts[1:3] == ["api", "models"]:
                repo, op, rev = f"{parts[3]}/{parts[4]}", parts[5], unquote("/".join(parts[6:]))
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                branches = hub.repos[repo]["branches"]
                if op == "discussions" and rev == "":  # open a pull request: a new refs/pr/N branch
                    num = 1 + sum(b.startswith("refs/pr/") for b in branches)
                    branches[f"refs/pr/{num}"] = dict(branches["main"])
                    return self._reply(200, {"num": num})
                if op == "branch":
                    if rev in branches:
                        return self._reply(409, {"error": "branch exists"})
                    branches[rev] = dict(branches["main"])
                    return self._reply(200, {})
                if rev not in branches:
                    return self._error(404, "RevisionNotFound")
                if op == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
                if op == "commit":
                    return self._commit(repo, rev, body, "create_pr" in query)
            self._error(404, "NotFound")

        def _commit(self, repo, rev, body, create_pr):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]["value"]
            files = {}
            for item in lines[1:]:
                assert item["key"] == "file", f"unexpected commit item {item['key']}"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            branches = hub.repos[repo]["branches"]
            target = f"refs/pr/{1 + sum(b.startswith('refs/pr/') for b in branches)}" if create_pr else rev
            branches[target] = {**branches[rev], **files}
            oid = hub.oid(repo, target)
            hub.commits.append({"repo": repo, "revision": target, "summary": header["summary"], "files": files})
            pr = f"{hub.url}/{repo}/discussions/{target.split('/')[-1]}" if create_pr else None
            self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr})

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            path, _, _ = self._start()
            parts = path.split("/")
            if len(parts) == 7 and parts[1:3] == ["api", "models"] and parts[5] == "discussions":
                repo, num = f"{parts[3]}/{parts[4]}", int(parts[6])
                return self._reply(200, {
                    "title": "PR", "num": num, "author": {"name": "alice"}, "createdAt": "2025-01-01T00:00:00.000Z",
                    "status": "draft", "repo": {"name": repo, "type": "model"}, "isPullRequest": True, "events": [],
                    "changes": {"base": "refs/heads/main"}, "filesWithConflicts": []})
            if len(parts) >= 6 and parts[3] == "resolve":
                repo, rev, name = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                files = hub.repos[repo]["branches"].get(rev)
                if files is None:
                    return self._error(404, "RevisionNotFound")
                if name not in files:
                    return self._error(404, "EntryNotFound")
                data = files[name]
                return self._reply(200, raw=data, headers={
                    "X-Repo-Commit": hub.oid(repo, rev), "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
            self._error(404, "NotFound")

    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub; ``huggingface_hub`` points at it and at an empty cache."""
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # HF_ENDPOINT and HF_HUB_CACHE are read when huggingface_hub is imported; patch what they set.
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield fake
    server.shutdown()
    server.server_close()


# --- dictionaries to publish -----------------------------------------------------------------


def tiny_itda(layer: int, n_atoms: int = 12, d_in: int = 16, seed: int = 0) -> ITDA:
    g = torch.Generator().manual_seed(seed + layer)
    labels = [AtomLabel(seq_index=i, position=i + 1, token_id=100 + i, token=f" w{i}", doc_id="hamlet",
                        char_span=(10 * i, 10 * i + 3), context=f"ctx «w{i}»") for i in range(n_atoms)]
    itda = ITDA.from_atoms(torch.randn(n_atoms, d_in, generator=g), k=4, labels=labels, loss_threshold=2e-4)
    md = itda.cfg.metadata
    md.model_name, md.hook_name, md.training_tokens = "smollm2-135m", f"blocks.{layer}.hook_resid_post", 49152
    md.dataset_path = "shakespeare"
    return itda


@pytest.fixture
def folder(tmp_path):
    """Two layers in SAELens's layout, one of them with an eval.json."""
    root = tmp_path / "release"
    for layer in (5, 15):
        tiny_itda(layer).save_model(root / f"blocks.{layer}.hook_resid_post")
    ev = {"without_sinks": {"explained_variance": 0.8123456, "cossim": 0.9, "mse": 1.5, "l0": 4.0}, "ce_loss_score": 0.7}
    (root / "blocks.15.hook_resid_post" / "eval.json").write_text(json.dumps(ev))
    return root


def front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def assert_same_itda(a: ITDA, b: ITDA):
    assert isinstance(b, ITDA)
    assert b.W_dec.dtype == torch.float32
    assert torch.equal(a.W_dec, b.W_dec)
    assert a.labels == b.labels and b.labels[3].doc_id == "hamlet"


# --- publishing ------------------------------------------------------------------------------


def test_push_folder_publishes_every_layer_and_the_model_card_in_one_commit(hub, folder):
    info = push_folder_to_hub(folder, REPO, private=True, endpoint=hub.url)

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == REPO and commit["revision"] == "main"
    layers = [f"blocks.{i}.hook_resid_post" for i in (5, 15)]
    expected = {"README.md"} | {f"{layer}/{f}" for layer in layers for f in ("cfg.json", "sae_weights.safetensors")}
    assert set(commit["files"]) == expected | {"blocks.15.hook_resid_post/eval.json"}
    for name in expected - {"README.md"}:
        assert commit["files"][name] == (folder / name).read_bytes()
    assert hub.repos[REPO]["private"] is True
    assert hub.repos[REPO]["create"]["visibility"] == "private"
    assert info.oid == hub.oid(REPO, "main")
    repo_calls = [auth for _, path, auth in hub.requests if path.startswith(("/api/repos", "/api/models"))]
    assert repo_calls and all(auth == f"Bearer {TOKEN}" for auth in repo_calls)  # token from HF_TOKEN

    meta = front_matter(commit["files"]["README.md"])
    assert meta["library_name"] == "saelens"
    assert {"itda", "sae_lens", "sae-lens-itda", *layers} <= set(meta["tags"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    by_path = {d["path"]: d for d in meta["itda_dictionaries"]}
    assert set(by_path) == set(layers)
    l15 = by_path["blocks.15.hook_resid_post"]
    assert (l15["hook_name"], l15["d_in"], l15["d_sae"], l15["k"]) == ("blocks.15.hook_resid_post", 16, 12, 4)
    assert (l15["loss_threshold"], l15["training_tokens"], l15["model_name"]) == (2e-4, 49152, "smollm2-135m")
    assert l15["explained_variance"] == 0.8123 and l15["ce_loss_score"] == 0.7
    assert "explained_variance" not in by_path["blocks.5.hook_resid_post"]
    assert f'SAE.from_pretrained("{REPO}", "blocks.5.hook_resid_post")' in commit["files"]["README.md"].decode()


def test_push_to_hub_then_from_pretrained_downloads_through_the_cache_and_works_offline(hub, monkeypatch):
    from sae_lens import SAE

    itda = tiny_itda(15)
    push_to_hub(itda, REPO, endpoint=hub.url)
    commit = hub.commits[0]
    assert set(commit["files"]) == {"README.md", "blocks.15.hook_resid_post/cfg.json",
                                    "blocks.15.hook_resid_post/sae_weights.safetensors"}
    assert hub.repos[REPO]["private"] is False

    loaded = SAE.from_pretrained(REPO, "blocks.15.hook_resid_post")  # SAELens: repo id + folder
    assert_same_itda(itda, loaded)
    cached = list(Path(constants.HF_HUB_CACHE).glob("models--alice--itda-test/snapshots/*/blocks.15.hook_resid_post/*"))
    assert {p.name for p in cached} == {"cfg.json", "sae_weights.safetensors"}

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n_requests = len(hub.requests)
    assert_same_itda(itda, SAE.from_pretrained(REPO, "blocks.15.hook_resid_post"))
    assert len(hub.requests) == n_requests  # served from the cache


def test_push_to_a_new_branch_and_load_that_revision(hub):
    push_to_hub(tiny_itda(5), REPO, endpoint=hub.url)  # main
    new = tiny_itda(5, seed=7)
    push_to_hub(new, REPO, path_in_repo="layer5", revision="v2", commit_message="second", endpoint=hub.url)

    assert [(c["revision"], c["summary"]) for c in hub.commits] == [("main", "Upload 1 ITDA dictionary"), ("v2", "second")]
    assert "layer5/cfg.json" in hub.repos[REPO]["branches"]["v2"]
    assert "layer5/cfg.json" not in hub.repos[REPO]["branches"]["main"]
    assert_same_itda(new, load_from_hub(REPO, "layer5", revision="v2"))


@pytest.mark.parametrize("xet", [True, False], ids=["pipelined", "legacy"])
def test_create_pr_opens_a_pull_request_instead_of_committing_to_main(hub, folder, monkeypatch, xet):
    # upload_folder takes a different path (and PR protocol) when hf_xet is not installed.
    import huggingface_hub.hf_api

    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: xet)
    push_folder_to_hub(folder, REPO, endpoint=hub.url)
    info = push_folder_to_hub(folder / "blocks.5.hook_resid_post", REPO, create_pr=True, endpoint=hub.url)
    assert hub.commits[-1]["revision"] == "refs/pr/1"
    assert info.pr_url.endswith("/discussions/1")
    with pytest.raises(ValueError, match="pull request"):
        push_folder_to_hub(folder, REPO, create_pr=True, revision="dev", endpoint=hub.url)


def test_publish_command(hub, folder, capsys):
    cli_main(["publish", str(folder), "bob/layers", "--private", "--revision", "exp", "--path-in-repo", "itdas"])

    commit = hub.commits[0]
    assert commit["repo"] == "bob/layers" and commit["revision"] == "exp"
    assert "README.md" in commit["files"] and "itdas/blocks.5.hook_resid_post/cfg.json" in commit["files"]
    meta = front_matter(commit["files"]["README.md"])
    assert {d["path"] for d in meta["itda_dictionaries"]} == {f"itdas/blocks.{i}.hook_resid_post" for i in (5, 15)}
    assert hub.repos["bob/layers"]["private"] is True
    assert "Published to" in capsys.readouterr().out


def test_an_existing_readme_is_kept_and_the_card_can_be_skipped(hub, folder):
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    push_folder_to_hub(folder, REPO, endpoint=hub.url)
    assert hub.commits[0]["files"]["README.md"] == b"---\nlicense: mit\n---\n# mine\n"
    push_folder_to_hub(folder, "alice/sub", path_in_repo="sub", endpoint=hub.url)
    assert hub.commits[1]["files"]["README.md"] == b"---\nlicense: mit\n---\n# mine\n"
    assert "sub/README.md" not in hub.commits[1]["files"] and "sub/blocks.5.hook_resid_post/cfg.json" in hub.commits[1]["files"]
    (folder / "README.md").unlink()
    push_folder_to_hub(folder, "alice/nocard", model_card=False, endpoint=hub.url)
    assert "README.md" not in hub.commits[2]["files"]


# --- errors ----------------------------------------------------------------------------------


def _topk_folder(root: Path) -> Path:
    folder = root / "blocks.3.hook_resid_post"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 16, "d_sae": 32, "k": 4}))
    (folder / "sae_weights.safetensors").write_bytes(b"")
    return folder


def test_publishing_refuses_non_itda_and_empty_folders_before_any_request(hub, tmp_path, folder):
    _topk_folder(folder)
    with pytest.raises(ValueError, match="not an ITDA.*'topk'"):
        push_folder_to_hub(folder, REPO, endpoint=hub.url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No dictionary"):
        find_dictionaries(tmp_path / "empty")
    with pytest.raises(SystemExit, match="No dictionary"):
        cli_main(["publish", str(tmp_path / "empty"), REPO])
    assert hub.requests == []


def test_loading_a_non_itda_folder_from_the_hub_fails_clearly(hub, tmp_path):
    from sae_lens import SAE

    from safetensors.torch import save

    hub.repos["carol/topk"] = {"private": False, "branches": {"main": {
        "l3/cfg.json": json.dumps({"architecture": "topk", "d_in": 16, "d_sae": 32, "k": 4}).encode(),
        "l3/sae_weights.safetensors": save({"W_dec": torch.zeros(32, 16)})}}}
    with pytest.raises(ValueError, match="not an ITDA dictionary.*'topk'"):
        load_from_hub("carol/topk", "l3")
    assert not any(p.endswith("sae_weights.safetensors") for _, p, _ in hub.requests)  # failed before the weights
    with pytest.raises(ValueError, match="not of type ITDA"):
        ITDA.from_pretrained("carol/topk", "l3")
    with pytest.raises(Exception, match="Entry Not Found"):
        SAE.from_pretrained("carol/topk", "missing")


# --- loading offline from a hand-populated Hub cache -------------------------------------------


def test_from_pretrained_offline_from_a_populated_hub_cache(tmp_path):
    """HF_HUB_OFFLINE=1 in a fresh interpreter: the cache layout alone is enough."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--alice--itda-layers"
    tiny_itda(15).save_model(repo / "snapshots" / sha / "blocks.15.hook_resid_post")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    _topk_folder(repo / "snapshots" / sha)
    script = """
import sae_lens_itda
from sae_lens import SAE
from sae_lens_itda import ITDA
from sae_lens_itda.io.hub import load_from_hub
sae = SAE.from_pretrained("alice/itda-layers", "blocks.15.hook_resid_post")
assert isinstance(sae, ITDA) and sae.cfg.d_sae == 12 and sae.W_dec.dtype.is_floating_point
print("OK", type(sae).__name__, sae.labels[3].doc_id, sae.labels[3].char_span)
assert load_from_hub("alice/itda-layers", "blocks.15.hook_resid_post").cfg.d_sae == 12
try:
    load_from_hub("alice/itda-layers", "blocks.3.hook_resid_post")
except ValueError as e:
    print("TOPK", e)
try:
    SAE.from_pretrained("alice/itda-layers", "nowhere")
except Exception as e:
    print("MISSING", type(e).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: any request would fail
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK ITDA hamlet (30, 33)" in out.stdout
    assert "TOPK" in out.stdout and "'topk'" in out.stdout
    assert "MISSING LocalEntryNotFoundError" in out.stdout
