"""The project's container image (Containerfile), built and run for real: a Debian bookworm
base made here with mmdebstrap, imported into buildah, the Containerfile built on it through
its BASE_IMAGE argument, then ``transact`` run inside the image (its version, the install, one
pipeline step). No daemon and no registry: buildah as root, vfs storage under tmp_path, chroot
isolation. pip inside the build reaches the package index; torch comes from a wheel this
machine's pip provides (``pip download``), passed in through the context's wheels/ folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
TORCH_REQ = next(d for d in PROJECT["dependencies"] if re.split(r"[^A-Za-z0-9_.-]", d)[0] == "torch")

BASE = "localhost/transact-test-base:bookworm"
IMAGE = f"localhost/transact:{VERSION}"
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
#: top-level entries of the checkout never copied into the test's context (big or machine-local;
#: .dockerignore drops the rest, which is part of what the build checks)
NOT_COPIED = {".git", ".venv", "runs", "wheels"}
#: where the host's CA bundle is mounted during the build (pip verifies TLS with it)
CA_IN_BUILD = "/run/host-ca.crt"


def _cannot_build() -> str:
    if os.geteuid() != 0:
        return "not root: the image build runs buildah as root (vfs storage, chroot isolation)"
    missing = [tool for tool in ("buildah", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install buildah mmdebstrap)"
    return ""


def _host_ca_bundle() -> Path | None:
    """The CA bundle the host's pip verifies TLS with (a TLS-intercepting proxy's CA lives there)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      os.environ.get("REQUESTS_CA_BUNDLE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rm -r, never through a mount point left under ``path`` (a chroot's /dev or /proc)."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False)
    if _mounts_under(path):
        print(f"left {path} in place: mount points remain under it")
        return
    shutil.rmtree(path, ignore_errors=True)


class Buildah:
    """buildah with its own storage (vfs) under ``store``: nothing outside it is touched."""

    def __init__(self, store: Path, log: Path):
        self.cmd = ["buildah", "--root", str(store / "root"), "--runroot", str(store / "runroot"),
                    "--storage-driver", "vfs"]
        self.log = log

    def __call__(self, *args: str, timeout: float = 300) -> str:
        """Runs one buildah command; its output is appended to the log and returned (stdout)."""
        start = time.monotonic()
        r = subprocess.run([*self.cmd, *args], capture_output=True, text=True, timeout=timeout)
        with self.log.open("a") as f:
            f.write(f"$ buildah {' '.join(args)}  # rc={r.returncode}, {time.monotonic() - start:.0f} s\n")
            f.write(r.stdout + r.stderr)
        assert r.returncode == 0, f"buildah {' '.join(args)} -> {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
        return r.stdout

    def run(self, container: str, *command: str, timeout: float = 300) -> str:
        return self(*["run", "--isolation", "chroot", container, "--", *command], timeout=timeout)


def _copy_context(dest: Path) -> None:
    """The checkout as a build context, outside the repository; wheels/ gets torch's wheel."""
    shutil.copytree(ROOT, dest, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if Path(folder) == ROOT and n in NOT_COPIED])
    wheels = dest / "wheels"
    wheels.mkdir()
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--dest", str(wheels), TORCH_REQ], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr


def _step(name: str, start: float) -> None:
    print(f"[image test] {name}: {time.monotonic() - start:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(bool(_cannot_build()), reason=_cannot_build() or "-")
def test_image_builds_and_runs_a_pipeline_step(tmp_path):
    t0 = time.monotonic()
    work = tmp_path / "image"
    store, ctx = work / "store", work / "context"
    work.mkdir()
    log = tmp_path / "buildah.log"  # kept after the run: what each buildah command said
    buildah = Buildah(store, log)
    try:
        # (a) a Debian bookworm base (Python 3.11) made here, imported as an image
        base_tar = work / "base.tar"
        r = subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
                            str(base_tar)], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        container = buildah("from", "scratch").strip()
        buildah("add", container, str(base_tar), "/")
        buildah("commit", "--rm", container, BASE)
        base_tar.unlink()
        _step("base image", t0)

        # (b) the project's Containerfile on that base; torch from the context's wheels/
        _copy_context(ctx)
        (wheel,) = (ctx / "wheels").glob("torch-*.whl")
        wheel_version = wheel.name.split("-")[1]
        ca = _host_ca_bundle()
        cert_args = ["--volume", f"{ca}:{CA_IN_BUILD}:ro", "--build-arg", f"PIP_CERT={CA_IN_BUILD}"] if ca else []
        buildah("bud", "--isolation", "chroot", "--pull=never", "-f", str(ctx / "Containerfile"), "-t", IMAGE,
                "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", f"VERSION={VERSION}",
                "--build-arg", "TORCH_INDEX_URL=", *cert_args, str(ctx), timeout=1500)
        _remove_tree(ctx)
        _step("build", t0)

        config = json.loads(buildah("inspect", "--type", "image", IMAGE))["OCIv1"]["config"]
        assert config["User"] == "10001:10001"
        assert config["Cmd"] == ["transact", "--help"] and not config.get("Entrypoint"), config
        assert config["Labels"]["org.opencontainers.image.version"] == VERSION
        assert config["Labels"]["org.opencontainers.image.source"]
        env = dict(e.split("=", 1) for e in config["Env"])
        assert env["BENTOML_DO_NOT_TRACK"] == "true" and env["GX_ANALYTICS_ENABLED"] == "false"
        assert env["ITERATIVE_DO_NOT_TRACK"] == "1" and env["BENTOML_HOME"].startswith(env["HOME"])

        # (c) the CLI's version, and the install: a site-packages package, not a source tree
        ctr = buildah("from", "--pull=never", IMAGE).strip()
        out = buildah.run(ctr, "transact", "--version")
        assert out.strip() == f"transact {VERSION}", out
        probe = (
            "import importlib.util, json, os, pathlib, tempfile\n"
            "import ray, torch, transact, transact.model, transact.serving\n"
            "from transact.features.feast.store import REPO_TEMPLATE\n"
            "from transact.serving.packaging import package_tree\n"
            "tempfile.NamedTemporaryFile(dir=os.environ['HOME']).close()\n"
            "tree = package_tree(pathlib.Path(tempfile.mkdtemp()) / 'ctx') / 'transact'\n"
            "print(json.dumps({'uid': os.getuid(), 'cwd': os.getcwd(), 'package': transact.__file__,\n"
            "  'torch': torch.__version__, 'ray': ray.__version__,\n"
            "  'test_extra': importlib.util.find_spec('pytest') is not None,\n"
            "  'feast_template': (REPO_TEMPLATE / 'definitions.py').is_file(),\n"
            "  'bento_tree': all((tree / f).is_file() for f in ('serving/service.py', 'serving/bentofile.yaml',\n"
            "                                                   'data/storage.py', 'cli.py'))}))\n"
        )
        facts = json.loads(buildah.run(ctr, "python", "-c", probe).strip().splitlines()[-1])
        print(f"[image test] inside the image: {facts}")
        assert facts["uid"] == 10001 and facts["cwd"] == "/home/transact"
        assert facts["package"].startswith("/opt/venv/lib/") and "site-packages" in facts["package"], facts
        assert facts["torch"] == wheel_version, f"torch {facts['torch']}, not the wheel passed in ({wheel.name})"
        assert facts["feast_template"] and not facts["test_extra"], facts
        assert facts["bento_tree"], facts  # a bento built in the image carries the installed package

        # (d) pipeline steps inside the image: simulate, validate, the Feast apply
        steps = ("transact simulate --profile tiny --out /tmp/w/world --no-progress"
                 " && transact validate /tmp/w/world --quarantine /tmp/w/quarantine --reference /tmp/w/reference.json"
                 " && transact features apply --repo /tmp/w/feast --world /tmp/w/world --no-progress")
        out = buildah.run(ctr, "sh", "-c", steps, timeout=600)
        print(out)
        assert "PASS world batch" in out and "new reference: /tmp/w/reference.json" in out, out
        assert "sqlite online store" in out, out
        _step("checks inside the image", t0)
    finally:
        if (store / "root").exists():
            for args in (("rm", "--all"), ("rmi", "--all", "--force")):
                subprocess.run([*buildah.cmd, *args], capture_output=True, timeout=300)
        _remove_tree(work)
        _step("cleaned up", t0)
