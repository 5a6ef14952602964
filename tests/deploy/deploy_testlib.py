"""Helpers shared by the deployment checks in tests/deploy/.

The checks run offline on Debian packages that scripts/setup installs
(kubectl or kubernetes-client, yamllint, python3-yaml, prometheus). A missing
tool fails the check with a message saying what to install.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY_DIR = os.environ.get("MERGEGUARD_BINARY_DIR", os.path.join(REPO, "build"))
BIN = os.path.join(BINARY_DIR, "bin")
DEPLOY = os.path.join(REPO, "deploy")

_failures = []


def fail(message):
    """Records a failed expectation and keeps going."""
    _failures.append(message)
    print("FAIL: " + message, flush=True)


def check(condition, message):
    if not condition:
        fail(message)
    return condition


def finish():
    """Exits 1 when any expectation failed."""
    if _failures:
        print("%d check(s) failed" % len(_failures))
        sys.exit(1)
    print("all checks passed")
    sys.exit(0)


def require_tool(name, package):
    path = shutil.which(name)
    if path is None:
        print("FAIL: `%s` is not installed; install the Debian package %s "
              "(scripts/setup does)" % (name, package))
        sys.exit(1)
    return path


def run(args, **kwargs):
    """Runs a command, returning CompletedProcess with text output."""
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


def kustomize(path):
    """Returns the objects `kubectl kustomize path` prints, as dicts."""
    kubectl = require_tool("kubectl", "kubernetes-client")
    result = run([kubectl, "kustomize", path])
    if result.returncode != 0:
        fail("kubectl kustomize %s failed:\n%s" % (path, result.stderr))
        return []
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects, kind, name=None):
    found = [o for o in objects if o.get("kind") == kind and
             (name is None or o["metadata"]["name"] == name)]
    return found[0] if found else None


def server_flags():
    """Flag names mergeguard-server accepts (from --helpfull)."""
    result = run([os.path.join(BIN, "mergeguard-server"), "--helpfull"])
    flags = set()
    for line in (result.stdout + result.stderr).splitlines():
        line = line.strip()
        if line.startswith("--"):
            flags.add(line[2:].split(" ")[0])
    if "store_dir" not in flags:
        fail("cannot read mergeguard-server --helpfull: %r" % result.stdout[:200])
    return flags


class Server:
    """bin/mergeguard-server on free ports, like tests/server/server_process.

    Started with `flags` followed by loopback listeners, port 0 and
    --port_file, so later flags override whatever `flags` sets for those.
    """

    def __init__(self, workdir, flags):
        self.workdir = workdir
        self.port_file = os.path.join(workdir, "ports")
        self.log_path = os.path.join(workdir, "server.log")
        args = [os.path.join(BIN, "mergeguard-server")] + list(flags) + [
            "--listen_host=127.0.0.1", "--metrics_host=127.0.0.1",
            "--port=0", "--metrics_port=0", "--min_free_bytes=0",
            "--port_file=" + self.port_file]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self.metrics_port = 0
        deadline = time.monotonic() + 120  # generous: a loaded 2-core machine
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("mergeguard-server exited during start:\n" + self.read_log())
            try:
                with open(self.port_file) as f:
                    parts = f.read().split()
                if len(parts) == 2:
                    self.port, self.metrics_port = int(parts[0]), int(parts[1])
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("mergeguard-server wrote no port file in 120s:\n" + self.read_log())

    def read_log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.log.close()


def temp_dir(prefix):
    return tempfile.mkdtemp(prefix=prefix + "-", dir=os.environ.get("TMPDIR"))


def write_tokens(directory):
    """A token file with one user token; returns (path, token)."""
    token = "deploy-test-token-0123456789abcdef"
    path = os.path.join(directory, "tokens")
    with open(path, "w") as f:
        f.write("%s acme user\n" % token)
    return path, token


def make_tls_certificates(directory):
    """A CA and a server certificate for localhost signed by it (openssl)."""
    openssl = require_tool("openssl", "openssl")

    def ssl(*args):
        result = run([openssl] + list(args), cwd=directory)
        if result.returncode != 0:
            raise RuntimeError("openssl %s: %s" % (" ".join(args), result.stderr))

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=mergeguard test CA", "-keyout", "ca.key", "-out", "ca.crt")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "tls.key", "-out", "tls.csr")
    with open(os.path.join(directory, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "tls.crt")
    return {name: os.path.join(directory, name) for name in ("ca.crt", "tls.crt", "tls.key")}
