"""A real OpenSSH server for the remote-bench tests: sshd on 127.0.0.1 at a free port, as the test user,
with a host key and a client key generated for the test; stopped by the fixture's finalizer.

Skips (with the install command) when the OpenSSH server or client is not installed.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL = "sudo apt-get install -y openssh-server openssh-client"


def _sshd() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)),
                                        None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str = "edgec-test") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   timeout=30)
    return path


@dataclass
class SSHServer:
    root: Path
    port: int
    user: str
    client_key: Path
    host_pub: str
    known_hosts: Path
    proc: subprocess.Popen

    def known_hosts_line(self, pub: str | None = None) -> str:
        return f"[127.0.0.1]:{self.port} {pub or self.host_pub}\n"

    def devices_yaml(self, path: Path, **extra: dict) -> Path:
        """A devices file with ``loop`` (this server, the test's Python) and entries from ``extra``."""
        import sys

        import yaml

        base = {"host": "127.0.0.1", "port": self.port, "user": self.user, "identity_file": str(self.client_key),
                "known_hosts": str(self.known_hosts), "python": sys.executable,
                "work_dir": str(self.root / "work"), "connect_timeout_s": 10, "timeout_s": 300}
        devices = {"loop": dict(base)}
        for name, over in extra.items():
            devices[name] = {**base, **over}
        path.write_text(yaml.safe_dump({"devices": devices}, sort_keys=False))
        return path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_sshd(root: Path, *, timeout: float = 20.0) -> SSHServer:
    sshd = _sshd()
    if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip(f"OpenSSH server/client not installed (needed by the remote tests): {INSTALL}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "work").mkdir(exist_ok=True)
    host_key = keygen(root / "host_ed25519", "edgec-test-host")
    client_key = keygen(root / "client_ed25519")
    auth = root / "authorized_keys"
    auth.write_text((root / "client_ed25519.pub").read_text())
    os.chmod(auth, 0o600)
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir (root only)
    port = free_port()
    cfg = root / "sshd_config"
    cfg.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {auth}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        "AllowTcpForwarding no", "X11Forwarding no", "PrintMotd no", "MaxStartups 50", "LoginGraceTime 30",
        "Subsystem sftp internal-sftp", "",
    ]))
    log = open(root / "sshd.log", "wb")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited ({proc.returncode}): {(root / 'sshd.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"sshd did not listen on 127.0.0.1:{port} within {timeout} s")
    host_pub = " ".join((root / "host_ed25519.pub").read_text().split()[:2])
    known = root / "known_hosts"
    server = SSHServer(root=root, port=port, user=getpass.getuser(), client_key=client_key, host_pub=host_pub,
                       known_hosts=known, proc=proc)
    known.write_text(server.known_hosts_line())
    return server
