"""Bench on a target device over SSH, with the OpenSSH client (``ssh`` via subprocess; no protocol here).

One bench is two SSH sessions:

1. a probe: the device's Python runs a stdlib-only snippet that reports its version, numpy,
   onnxruntime and providers (one clear error when any is missing, saying what to install);
2. the job: a tar stream on stdin carries the torch-free runner (``edgec/runtime/`` as
   ``edgec_runtime/``), the artifact and the eval arrays (.npy); a small bootstrap run by the device's
   Python unpacks it into a fresh ``edgec-<random>`` folder under the device's work dir, runs
   :func:`edgec.runtime.device.main` there (the measurement a local bench makes), prints the JSON and
   removes the folder (a third session removes it if the job was cut off).

Safe by default: ``BatchMode`` (never a password prompt), public-key authentication only,
``StrictHostKeyChecking=yes`` against known_hosts (``accept-new`` only with ``--accept-new-host-key``,
which still refuses a changed key), ``ConnectTimeout`` and a limit on the whole job (``timeout_s``, also
enforced on the device by the bootstrap's alarm), every remote argument quoted with :func:`shlex.quote`.
"""
from __future__ import annotations

import io
import json
import re
import secrets
import shlex
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from edgec.devices import Device, resolve_device
from edgec.errors import (DeviceAuthError, DeviceError, DeviceSetupError, DeviceUnreachable, HostKeyError,
                          InputError)

__all__ = ["SSHDevice", "check_runtime_supports", "measure_on_device", "ort_limits"]

RUNTIME_DIR = Path(__file__).resolve().parents[1] / "runtime"
PACKAGE = "edgec_runtime"  # the runner's package name on the device (relative imports only)
MIN_PYTHON = (3, 8)

# the device's Python: stdlib only, so it runs (and reports) whatever is missing
PROBE = r"""
import json, os, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine()}
for name in ("numpy", "onnxruntime"):
    try:
        mod = __import__(name)
        out[name] = getattr(mod, "__version__", "?")
    except Exception as e:
        out[name] = None
        out[name + "_error"] = "%s: %s" % (type(e).__name__, e)
if out["onnxruntime"]:
    out["providers"] = list(sys.modules["onnxruntime"].get_available_providers())
print("EDGEC-PROBE " + json.dumps(out))
"""

# unpack the job (tar on stdin) into a fresh folder, run it, always remove the folder
BOOTSTRAP = r"""
import os, shutil, signal, sys, tarfile, tempfile
base, name, limit = sys.argv[1] or tempfile.gettempdir(), sys.argv[2], int(sys.argv[3])
d = os.path.join(base, name)
def stop(*_):
    raise SystemExit(124)
if hasattr(signal, "SIGALRM"):  # the device stops itself at the limit (and still removes the folder)
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(limit)
os.makedirs(d, mode=0o700)
code = 1
try:
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(d, filter="data")
        else:
            t.extractall(d)
    sys.path.insert(0, d)
    from edgec_runtime.device import main
    code = main([os.path.join(d, "job.json")])
finally:
    shutil.rmtree(d, ignore_errors=True)
sys.exit(code)
"""

CLEANUP = ("import os, shutil, sys, tempfile; "
           "shutil.rmtree(os.path.join(sys.argv[1] or tempfile.gettempdir(), sys.argv[2]), ignore_errors=True)")

# what an onnxruntime release runs at most (ORT's compatibility table); newer releases are not
# pre-checked (their load error is reported instead)
_ORT_MAX = {(1, 8): (13, 7), (1, 9): (14, 7), (1, 10): (15, 8), (1, 11): (16, 8), (1, 12): (17, 8),
            (1, 13): (17, 8), (1, 14): (18, 8), (1, 15): (19, 9), (1, 16): (19, 9), (1, 17): (20, 9),
            (1, 18): (21, 10), (1, 19): (21, 10), (1, 20): (21, 10)}


# ---------------------------------------------------------------------------------------- ssh
def _signal(code: int) -> str:
    """', killed by signal N' for a shell's 128+N exit status (e.g. 139: a segfault importing onnxruntime)."""
    return f", killed by signal {code - 128}" if 128 < code < 160 else ""


class SSHDevice:
    """Commands on one device through the OpenSSH client, each failure mapped to one DeviceError."""

    def __init__(self, device: Device, *, accept_new_host_key: bool = False):
        self.device = device
        self.accept_new_host_key = accept_new_host_key

    def _known_hosts(self) -> str:
        return self.device.known_hosts or "~/.ssh/known_hosts"

    def ssh_command(self, remote_command: str) -> list[str]:
        d = self.device
        cmd = ["ssh", "-T", "-p", str(d.port),
               "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=" + ("accept-new" if self.accept_new_host_key else "yes"),
               "-o", f"ConnectTimeout={d.connect_timeout_s}",
               "-o", "PreferredAuthentications=publickey", "-o", "PasswordAuthentication=no",
               "-o", "KbdInteractiveAuthentication=no", "-o", "ServerAliveInterval=15",
               "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR"]
        if d.known_hosts:
            cmd += ["-o", f"UserKnownHostsFile={d.known_hosts}"]
        if d.identity_file:
            cmd += ["-i", d.identity_file, "-o", "IdentitiesOnly=yes"]
        return cmd + [d.destination, remote_command]

    def run(self, remote_command: str, *, stdin: bytes | None = None, timeout: float | None = None,
            what: str = "the command") -> subprocess.CompletedProcess:
        """Run ``remote_command`` (a shell string: quote every part) and return the finished process;
        SSH-level failures (exit 255 with ssh's own message) raise the matching DeviceError."""
        timeout = timeout or self.device.timeout_s
        try:
            proc = subprocess.run(self.ssh_command(remote_command), input=stdin, capture_output=True,
                                  timeout=timeout)
        except FileNotFoundError as e:
            raise DeviceError("the OpenSSH client (ssh) is not installed on this machine",
                              hint="install it: sudo apt-get install openssh-client (macOS has it built in)") from e
        except subprocess.TimeoutExpired as e:
            raise DeviceError(f"{what} on {self.device.label} did not finish within {timeout:g} s",
                              hint="raise timeout_s in the devices file, or bench with fewer --runs / "
                                   "--eval-samples") from e
        if proc.returncode == 255:
            self._raise_ssh_error(proc.stderr.decode(errors="replace"))
        return proc

    def _raise_ssh_error(self, err: str) -> None:
        d = self.device
        key_name = d.host if d.port == 22 else f"[{d.host}]:{d.port}"
        kh = self._known_hosts()
        first = next((ln.strip() for ln in err.splitlines() if ln.strip() and not ln.startswith("@")), err.strip())
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err or "has changed and you have requested strict" in err:
            raise HostKeyError(
                f"the host key of {key_name} differs from the one recorded in {kh}: the device was "
                f"re-installed, or someone is in between (refused)",
                hint=f"check the device's fingerprint on its console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub);"
                     f" if it is right, forget the old key with: ssh-keygen -R {shlex.quote(key_name)} -f {kh}")
        if "Host key verification failed" in err or "host key is known for" in err:
            scan = f"ssh-keyscan -p {d.port} {shlex.quote(d.host)} >> {kh}"
            raise HostKeyError(
                f"the host key of {key_name} is not in {kh}, so the device cannot be verified (refused)",
                hint=f"compare `ssh-keyscan -p {d.port} {shlex.quote(d.host)} | ssh-keygen -lf -` with the device's own "
                     f"fingerprint, then trust it with: {scan}  (or rerun with --accept-new-host-key)")
        if "Permission denied" in err or "Too many authentication failures" in err:
            raise DeviceAuthError(
                f"{d.destination} (port {d.port}) refused key authentication: {first}",
                hint="put your public key in the device's ~/.ssh/authorized_keys (ssh-copy-id -p "
                     f"{d.port} {d.destination}) and set identity_file in the devices file, or load the key "
                     "into ssh-agent; passwords are never used")
        if re.search(r"Connection refused|timed out|No route to host|Could not resolve hostname|"
                     r"Network is unreachable|Connection closed|Connection reset|Name or service not known", err):
            raise DeviceUnreachable(
                f"cannot reach {d.label} ({d.destination}, port {d.port}): {first}",
                hint="check that the device is on, its sshd runs on that port and the address is right "
                     "(ssh -p PORT USER@HOST true)")
        raise DeviceError(f"ssh to {d.label} failed: {err.strip()[-600:] or 'exit 255'}",
                          hint=f"try it by hand: ssh -p {d.port} {d.destination} true")

    # --------------------------------------------------------------------------------- python
    def python(self, code: str, *args: str) -> str:
        return " ".join(shlex.quote(a) for a in (self.device.python, "-c", code, *args))

    def probe(self) -> dict:
        """The device's Python, numpy, onnxruntime and providers; raises DeviceSetupError when one is missing."""
        d = self.device
        proc = self.run(self.python(PROBE), timeout=d.connect_timeout_s + 120, what="the probe")
        out = proc.stdout.decode(errors="replace")
        line = next((ln for ln in out.splitlines() if ln.startswith("EDGEC-PROBE ")), None)
        err = proc.stderr.decode(errors="replace").strip()
        if line is None:
            if proc.returncode == 127 or "not found" in err:
                raise DeviceSetupError(
                    f"no Python at {d.python!r} on {d.label} ({err[-200:] or 'command not found'})",
                    hint="install Python 3 on the device (Debian / Raspberry Pi OS: sudo apt-get install python3 "
                         "python3-pip), or set `python:` in the devices file to its path")
            raise DeviceSetupError(f"the device's Python {d.python!r} failed to run the probe (exit {proc.returncode}"
                                   f"{_signal(proc.returncode)}): "
                                   f"{err[-600:]}", hint=f"run it by hand on the device: {d.python} -c 'import onnxruntime'")
        facts = json.loads(line[len("EDGEC-PROBE "):])
        pip = f"{d.python} -m pip install"
        if tuple(int(p) for p in facts["python"].split(".")[:2]) < MIN_PYTHON:
            raise DeviceSetupError(f"{d.label} has Python {facts['python']}; the runner needs Python >= 3.8",
                                   hint="install a newer python3 on the device and point `python:` at it")
        missing = [m for m in ("numpy", "onnxruntime") if not facts.get(m)]
        if missing:
            why = "; ".join(f"{m}: {facts.get(m + '_error', 'missing')}" for m in missing)
            raise DeviceSetupError(f"{' and '.join(missing)} cannot be imported by {d.python} on {d.label} ({why})",
                                   hint=f"install on the device: {pip} {' '.join(missing)}")
        absent = [p for p in d.providers if p not in facts.get("providers", [])]
        if absent:
            raise DeviceSetupError(
                f"execution provider(s) {', '.join(absent)} not available in onnxruntime {facts['onnxruntime']} "
                f"on {d.label} (it has {', '.join(facts.get('providers', []))})",
                hint="install a build that has them on the device (onnxruntime-gpu for CUDA), or change `providers:`")
        return facts

    def remove(self, name: str) -> None:
        """Remove the bench folder ``name`` under the work dir (after a job that was cut off)."""
        try:
            self.run(self.python(CLEANUP, self.device.work_dir or "", name), timeout=self.device.connect_timeout_s + 30,
                     what="the clean-up")
        except DeviceError:
            pass


# ------------------------------------------------------------------------------------ models
def ort_limits(version: str) -> tuple[int, int] | None:
    """(highest ai.onnx opset, highest IR version) that onnxruntime ``version`` runs, None if not tabled."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return _ORT_MAX.get((int(m.group(1)), int(m.group(2)))) if m else None


def _model_needs(paths: list[Path]) -> tuple[int, int]:
    import onnx

    opset = ir = 0
    for p in paths:
        m = onnx.load(str(p), load_external_data=False)
        ir = max(ir, m.ir_version)
        opset = max([opset] + [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")])
    return opset, ir


def check_runtime_supports(version: str, paths: list[Path], label: str) -> None:
    """DeviceSetupError when onnxruntime ``version`` is older than the models' opset / IR version need."""
    opset, ir = _model_needs(paths)
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and (int(m.group(1)), int(m.group(2))) < (1, 8):
        raise DeviceSetupError(f"onnxruntime {version} on {label} is older than the runner supports (1.8)",
                               hint="install a newer one on the device: python3 -m pip install -U onnxruntime")
    limits = ort_limits(version)
    if limits and (opset > limits[0] or ir > limits[1]):
        raise DeviceSetupError(
            f"onnxruntime {version} on {label} is too old for this model: it needs opset {opset} / IR version {ir}, "
            f"onnxruntime {version} runs up to opset {limits[0]} / IR version {limits[1]}",
            hint="install a newer onnxruntime on the device (python3 -m pip install -U onnxruntime), or re-export "
                 f"with --opset {limits[0]} or lower")


def _load_error(message: str, version: str, opset: int, ir: int, label: str) -> DeviceSetupError:
    ops = re.findall(r"Could not find an implementation for (\w+\(\d+\))", message)
    ops += re.findall(r"([\w.]+:\w+)\(-?\d+\) is not a registered function/op", message)
    ops += [f"{o} (domain {dom or 'ai.onnx'})" for o, dom in
            re.findall(r"In Node, \(\s*\"[^\"]*\",\s*(\w+),\s*\"([^\"]*)\"", message)]
    ops = sorted(set(ops))
    which = f"op(s) {', '.join(ops)}" if ops else f"opset {opset} / IR version {ir}"
    detail = message.split(". Check that the file")[0]
    return DeviceSetupError(
        f"onnxruntime {version} on {label} cannot run this model ({which}): {detail[-700:]}",
        hint="install a newer onnxruntime on the device (python3 -m pip install -U onnxruntime), or re-export "
             "with a lower --opset / without that op")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _external_files(path: Path) -> list[Path]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return [path.parent / n for n in sorted(names)]


def _pack(files: dict[str, Path | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for arc, src in files.items():
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            info = tarfile.TarInfo(arc)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _runtime_files() -> dict[str, Path]:
    return {f"{PACKAGE}/{p.name}": p for p in sorted(RUNTIME_DIR.glob("*.py"))}


def _artifact_files(model: Path, kind: str) -> tuple[dict[str, Path], str, list[Path]]:
    """The files to copy (archive name -> local file), the job's model path and the ONNX graphs."""
    if kind == "ensemble":
        from edgec.runtime.ensemble import MANIFEST, manifest_path, read_manifest

        mpath = Path(manifest_path(model))
        _, meta = read_manifest(mpath, verify=True)
        graphs = [mpath.parent / m for m in meta["members"]]
        files = {f"artifact/{MANIFEST}": mpath, **{f"artifact/{m}": mpath.parent / m for m in meta["members"]}}
        return files, f"artifact/{MANIFEST}", graphs
    if kind == "profile":  # several models, profiled against each other (edgec profile --remote)
        files, arcs, graphs = {}, [], []
        for k, m in enumerate(model):
            one, arc, g = _artifact_files(Path(m), "model")
            files.update({a.replace("artifact/", f"artifact{k}/", 1): src for a, src in one.items()})
            arcs.append(arc.replace("artifact/", f"artifact{k}/", 1))
            graphs += g
        return files, arcs, graphs
    files = {f"artifact/{model.name}": model}
    files.update({f"artifact/{p.name}": p for p in _external_files(model)})
    return files, f"artifact/{model.name}", [model]


def measure_on_device(model: str | Path, remote: str | Device, *, kind: str = "model", inputs=None, labels=None,
                      adv: dict | None = None, threads: int = 1, batch: int = 1, warmup: int = 10, runs: int = 100,
                      rounds: int = 3, providers: list[str] | None = None, devices_file=None,
                      accept_new_host_key: bool = False, outputs: bool = False) -> tuple[dict, dict]:
    """Run :func:`edgec.runtime.device.main` for ``model`` on the device; return ``(measured, device)``:
    what the device measured (as :func:`~edgec.runtime.device.measure_model` /
    :func:`~edgec.runtime.device.measure_ensemble` return it; ``outputs``: with the model's logits on
    ``inputs``, ``measured["logits"]``) and the device's facts and label. ``kind="profile"``: ``model`` is a
    list of ONNX files, profiled against each other (:func:`edgec.runtime.profile.profile_job`)."""
    dev = remote if isinstance(remote, Device) else resolve_device(remote, devices_file)
    if providers:
        dev = dev.model_copy(update={"providers": list(providers)})
    ssh = SSHDevice(dev, accept_new_host_key=accept_new_host_key)
    facts = ssh.probe()
    files, model_arc, graphs = _artifact_files(model if kind == "profile" else Path(model), kind)
    check_runtime_supports(facts["onnxruntime"], graphs, dev.label)
    job: dict[str, Any] = {"kind": kind, "model": model_arc, "threads": threads, "batch": batch, "warmup": warmup,
                           "runs": runs, "rounds": rounds, "providers": dev.providers, "inputs": None, "labels": None,
                           "outputs": outputs}
    blobs: dict[str, Path | bytes] = {**_runtime_files(), **files}
    if inputs is not None:
        blobs["x.npy"], job["inputs"] = _npy(np.asarray(inputs, dtype=np.float32)), "x.npy"
    if labels is not None:
        blobs["y.npy"], job["labels"] = _npy(np.asarray(labels)), "y.npy"
    if adv is not None:
        job["adv"] = {}
        for k in ("x", "y", "x_clean"):
            blobs[f"adv_{k}.npy"], job["adv"][k] = _npy(np.asarray(adv[k])), f"adv_{k}.npy"
    blobs["job.json"] = json.dumps(job).encode()
    name = "edgec-" + secrets.token_hex(8)
    try:  # the device's own limit first, so it reports and cleans up; ssh's a little later
        proc = ssh.run(ssh.python(BOOTSTRAP, dev.work_dir or "", name, str(dev.timeout_s)), stdin=_pack(blobs),
                       timeout=dev.timeout_s + dev.connect_timeout_s + 30, what="the bench")
    except DeviceError:
        ssh.remove(name)
        raise
    from edgec.runtime.device import BEGIN, END

    out = proc.stdout.decode(errors="replace")
    if proc.returncode == 124 and BEGIN not in out:
        raise DeviceError(f"the bench on {dev.label} did not finish within timeout_s = {dev.timeout_s} s "
                          "(stopped on the device, its folder removed)",
                          hint="raise timeout_s in the devices file, or bench with fewer --runs / --eval-samples")
    if BEGIN not in out or END not in out:
        ssh.remove(name)  # a crash (a signal) skips the bootstrap's own clean-up
        err = proc.stderr.decode(errors="replace").strip()
        raise DeviceError(f"the bench on {dev.label} failed (exit {proc.returncode}{_signal(proc.returncode)}): "
                          f"{err[-1500:]}",
                          hint=f"the device's work dir must be writable ({dev.work_dir or 'its temp dir'}); "
                               "run with --verbose for details")
    reply = json.loads(out.split(BEGIN, 1)[1].split(END, 1)[0])
    device = {"name": dev.label, "url": dev.url, "remote": True, "emulated": dev.emulated, **reply["facts"]}
    if "error" in reply:
        if reply["error"]["kind"] == "model_load":
            opset, ir = _model_needs(graphs)
            raise _load_error(reply["error"]["message"], facts["onnxruntime"], opset, ir, dev.label)
        raise DeviceError(f"the runner on {dev.label} refused the job: {reply['error']['message']}")
    return reply["result"], device
