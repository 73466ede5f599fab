"""EED wiring: compress -> export (member graphs + ensemble.json) -> bench with robustness, through the
real CLI on digits, the device runner on the artifact, and the bad-input cases of the artifact."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_util import run_cli, subprocess_env
from edgec.runtime import ModelNotFoundError, RunnerError
from edgec.runtime.ensemble import MANIFEST, DynamicEnsemble, early_exit

pytestmark = pytest.mark.integration  # a compress run through the CLI and the exported ensemble it writes


EED_RECIPE = """\
version: 1
name: eed-digits
stages:
  - method: eed
    scores: [magnitude, snip, fisher_w2]
    target_sparsity: 0.5
    epochs: 1
    batch_size: 32
    optimizer: adam
    lr: 0.001
    weight_decay: 0.0
    adversarial: {eps: 0.1, step: 0.03, steps: 2}
bench: {warmup: 2, runs: 20, pgd_samples: 80, pgd_steps: 5}
"""




def _runner(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgec.runtime", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(OMP_NUM_THREADS="1"))


# ----------------------------------------------------------------------------------------------
# end to end: compress --recipe eed ends with the dynamic artifact and its report rows


@pytest.fixture(scope="module")
def eed_run(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_attacks import _train_digits

    from edgec.models import save_weights

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("eed")
    base_model, _ = _train_digits(epochs=3)
    base = save_weights(base_model, tmp / "base.pt")
    recipe = tmp / "eed.yaml"
    recipe.write_text(EED_RECIPE)
    out = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "edgec", "compress", "--model", "digits_cnn", "--weights", str(base),
                           "--data", "digits", "--recipe", str(recipe), "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "exported dynamic ensemble" in proc.stdout and "latency dynamic / all-3" in proc.stdout
    return out


def test_compress_eed_writes_the_dynamic_artifact_and_report_rows(eed_run):
    from edgec.runs import rebuild_model
    from edgec.data import load_data, to_numpy
    from edgec.stages.eed import member_probs

    ens_dir = eed_run / "export" / "ensemble"
    manifest = json.loads((ens_dir / MANIFEST).read_text())
    assert manifest["members"] == ["member0.onnx", "member1.onnx", "member2.onnx"]
    assert set(manifest["sha256"]) == set(manifest["members"])
    assert manifest["scores"] == ["magnitude", "snip", "fisher_w2"] and manifest["num_classes"] == 10
    model = rebuild_model(eed_run, "final")
    assert manifest["threshold"] == pytest.approx(float(model.threshold))
    check = json.loads((ens_dir / "ensemble.check.json").read_text())
    assert check["exit_agreement"] == 1.0 and check["member_prob_max_abs_diff"] < 1e-4

    rows = json.loads((eed_run / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["fp32 input", "eed-digits", "eed-digits dynamic (early exit)",
                                         "eed-digits all 3 members"]
    dyn_row, full_row = rows[2], rows[3]
    # the numbers in the report are those of the artifact: recompute them independently
    data = load_data("digits")
    x, y = to_numpy(data.eval)
    dyn = DynamicEnsemble.load(ens_dir)
    pred, used = dyn.predict_batched(x)
    assert dyn_row["accuracy"] == pytest.approx(float((pred == y).mean()))
    assert dyn_row["avg_members"] == pytest.approx(float(used.mean()))
    assert 1.0 <= dyn_row["avg_members"] <= 3.0 and full_row["avg_members"] == 3.0
    probs, labels = member_probs(model, data.eval, "cpu")
    sim_pred, sim_used, _ = early_exit(probs.numpy(), threshold=dyn.threshold, agree=dyn.agree)
    assert np.array_equal(sim_used, used)  # the ORT controller exits where the PyTorch simulation does
    full = probs.numpy().mean(0).argmax(1)
    assert full_row["accuracy"] == pytest.approx(float((full == labels.numpy()).mean()), abs=1 / len(y))
    assert rows[1]["accuracy"] == pytest.approx(full_row["accuracy"], abs=1 / len(y))  # one graph == K graphs
    # latency of both modes from one interleaved run, and the ratio between them
    assert dyn_row["latency_ratio_vs_all_k"] == pytest.approx(dyn_row["latency_mean_ms"] / full_row["latency_mean_ms"])
    assert full_row["latency_ratio_vs_all_k"] == 1.0
    # PGD: white-box on the PyTorch models, evaluated on the exported artifacts (80 seeded samples)
    for r in rows:
        assert r["pgd"].startswith("PGD-5 L-inf eps 25.5/255") and "80 seeded eval samples" in r["pgd"]
        assert 0.0 <= r["pgd_accuracy"] <= 1.0
    assert full_row["pgd_accuracy"] < full_row["clean_accuracy_pgd_subset"] - 0.1  # eps 0.1 hurts digits
    assert full_row["pgd_accuracy"] == pytest.approx(rows[1]["pgd_accuracy"], abs=1 / 80)
    assert rows[0]["pgd_accuracy"] < rows[0]["clean_accuracy_pgd_subset"]
    md = (eed_run / "report.md").read_text()
    assert "## Robustness and dynamic inference" in md
    line = next(s for s in md.splitlines() if s.startswith("| eed-digits dynamic (early exit) |") and "×" in s
                and s.count("|") == 7)
    assert f"{dyn_row['avg_members']:.2f}" in line and f"{100 * dyn_row['pgd_accuracy']:.2f}" in line


def test_bench_cli_on_the_ensemble_reports_members_latency_and_pgd(eed_run, tmp_path, capsys):
    rows = json.loads((eed_run / "report.json").read_text())["rows"]
    out = tmp_path / "bench.json"
    res = run_cli(capsys, "bench", eed_run / "export" / "ensemble" / MANIFEST, "--data", "digits", "--runs", "15",
                  "--warmup", "2", "--pgd-samples", "40", "--pgd-steps", "3", "--json", out)
    assert res.code == 0, res.err + res.out
    b = json.loads(out.read_text())
    assert b["k"] == 3 and b["samples"] == 360
    assert b["accuracy_dynamic"] == pytest.approx(rows[2]["accuracy"])  # same artifact, same eval set
    assert b["avg_members"] == pytest.approx(rows[2]["avg_members"])
    assert b["latency"]["inputs"] == 15 and b["latency"]["full"]["avg_members"] == 3.0
    assert b["latency_ratio_dynamic_vs_full"] == pytest.approx(
        b["latency"]["dynamic"]["mean_ms"] / b["latency"]["full"]["mean_ms"])
    rob = b["robust"]
    assert rob["samples"] == 40 and rob["attack"].startswith("PGD-3 L-inf eps 25.5/255")
    assert rob["robust_accuracy_full"] < rob["clean_accuracy_full"]
    text = " ".join(res.out.split())  # rich wraps the table at the terminal width
    assert "all 3 members" in text and f"latency dynamic / all-3: x{b['latency_ratio_dynamic_vs_full']:.3f}" in text

    # the folder works as well; an explicit --pgd-eps overrides the run's eps; --pgd-samples 0 = no attack
    res = run_cli(capsys, "bench", eed_run / "export" / "ensemble", "--data", "digits", "--runs", "5", "--warmup", "0",
                  "--pgd-samples", "0", "--json", out)
    assert res.code == 0, res.err
    assert "robust" not in json.loads(out.read_text())


def test_export_cli_rewrites_the_dynamic_artifact(eed_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(eed_run, copy)
    shutil.rmtree(copy / "export")
    res = run_cli(capsys, "export", copy)
    assert res.code == 0, res.err + res.out
    old = json.loads((eed_run / "export" / "ensemble" / MANIFEST).read_text())
    new = json.loads((copy / "export" / "ensemble" / MANIFEST).read_text())
    assert new["threshold"] == old["threshold"] and new["members"] == old["members"]
    assert DynamicEnsemble.load(copy / "export" / "ensemble").k == 3


def test_device_runner_predicts_with_early_exit(eed_run, tmp_path):
    from edgec.data import load_data, to_numpy

    x, y = to_numpy(load_data("digits").eval)
    x = x[:25]
    np.save(tmp_path / "x.npy", x)
    proc = _runner(eed_run / "export" / "ensemble" / MANIFEST, "--input", tmp_path / "x.npy")
    assert proc.returncode == 0, proc.stderr
    lines = [s.split("\t") for s in proc.stdout.splitlines() if not s.startswith("#")]
    dyn = DynamicEnsemble.load(eed_run / "export" / "ensemble")
    pred, used = dyn.predict(x)
    assert [int(s[0]) for s in lines] == list(range(25))
    assert [int(s[1]) for s in lines] == pred.tolist()
    assert [s[2] for s in lines] == [str(c) for c in pred.tolist()]  # class names travel in ensemble.json
    assert [int(s[-1]) for s in lines] == used.tolist()
    proc = _runner(eed_run / "export" / "ensemble", "--input", tmp_path / "x.npy", "--bench", "--runs", "10",
                   "--warmup", "1")
    assert proc.returncode == 0, proc.stderr
    b = json.loads(proc.stdout)
    assert b["inputs"] == 10 and b["full"]["avg_members"] == 3.0 and not b["torch_imported"]


# ----------------------------------------------------------------------------------------------
# the artifact's bad-input cases (a random, untrained ensemble is enough)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from edgec import masks as P
    from edgec.models import create_model
    from edgec.export.ensemble import export_dynamic
    from edgec.stages.eed import Ensemble

    torch.manual_seed(0)
    members = [create_model("digits_cnn") for _ in range(3)]
    for m in members:
        P.ensure_masks(P.prunable_layers(m))
    ens = Ensemble(members).eval()
    ens.threshold.fill_(0.5)
    return export_dynamic(ens, (1, 8, 8), tmp_path_factory.mktemp("artifact") / "ens"), ens


def _broken(artifact, tmp_path, edit) -> Path:
    folder = tmp_path / "ens"
    shutil.copytree(artifact[0], folder)
    edit(folder)
    return folder


def test_missing_member_file_is_a_clear_error(artifact, tmp_path, capsys):
    folder = _broken(artifact, tmp_path, lambda f: (f / "member1.onnx").unlink())
    with pytest.raises(ModelNotFoundError, match=r"'member1.onnx' \(looked for .*member1.onnx\)"):
        DynamicEnsemble.load(folder)
    res = run_cli(capsys, "bench", folder / MANIFEST, "--data", "digits")
    assert res.code == 2
    assert "lists member model(s) that do not exist: 'member1.onnx'" in res.err and "Traceback" not in res.err
    proc = _runner(folder / MANIFEST, "--input", tmp_path / "nothing.npy")
    assert proc.returncode == 2 and "'member1.onnx'" in proc.stderr and "Traceback" not in proc.stderr


def test_manifest_naming_a_member_that_is_not_there(artifact, tmp_path, capsys):
    def rename(f):
        m = json.loads((f / MANIFEST).read_text())
        m["members"][2] = "member_final.onnx"
        (f / MANIFEST).write_text(json.dumps(m))

    folder = _broken(artifact, tmp_path, rename)
    res = run_cli(capsys, "bench", folder)
    assert res.code == 2 and "'member_final.onnx'" in res.err


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(threshold=1.5), "'threshold' must be a probability"),
    (lambda m: m.update(agree=7), "'agree' must be null or an integer in [2, 3]"),
    (lambda m: m.update(members=[]), "'members' must be a non-empty list"),
    (lambda m: m.update(format="something-else"), "is not an edgec dynamic-ensemble manifest"),
])
def test_invalid_manifest_fields(artifact, tmp_path, capsys, edit, message):
    def change(f):
        m = json.loads((f / MANIFEST).read_text())
        edit(m)
        (f / MANIFEST).write_text(json.dumps(m))

    folder = _broken(artifact, tmp_path, change)
    with pytest.raises(RunnerError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DynamicEnsemble.load(folder)
    res = run_cli(capsys, "bench", folder / MANIFEST)
    assert res.code == 2 and message in res.err


def test_unreadable_manifest_and_swapped_member(artifact, tmp_path, capsys):
    folder = _broken(artifact, tmp_path, lambda f: (f / MANIFEST).write_text("{not json"))
    res = run_cli(capsys, "bench", folder)
    assert res.code == 2 and "as JSON" in res.err
    swapped = _broken(artifact, tmp_path / "b", lambda f: shutil.copy(f / "member0.onnx", f / "member2.onnx"))
    res = run_cli(capsys, "bench", swapped / MANIFEST)
    assert res.code == 2 and "'member2.onnx' do not match the sha256" in res.err
    assert DynamicEnsemble.load(swapped, verify=False).k == 3  # verification can be skipped on purpose
    res = run_cli(capsys, "bench", tmp_path / "absent.json")
    assert res.code == 2 and "does not exist" in res.err


def test_run_that_does_not_match_the_artifact_is_refused(artifact):
    from edgec.bench.ensemble import _check_run_matches
    from edgec.errors import InputError

    folder, ens = artifact
    x = torch.rand(8, 1, 8, 8).numpy()
    _check_run_matches(ens, folder / MANIFEST, x)  # the model it was exported from: fine
    other = copy.deepcopy(ens)
    classifier = [m for m in other.members[1].modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        classifier.weight.mul_(3.0)
    with pytest.raises(InputError, match="disagrees"):
        _check_run_matches(other, folder / MANIFEST, x)


def test_compare_latency_counts_members_per_mode(artifact):
    folder, _ = artifact
    dyn = DynamicEnsemble.load(folder)
    x = np.random.default_rng(0).standard_normal((12, 1, 8, 8)).astype(np.float32)
    dyn.threshold = 0.0  # every input stops after the first member
    lat = dyn.compare_latency(x, rounds=2, warmup=1)
    assert lat["dynamic"]["avg_members"] == 1.0 and lat["full"]["avg_members"] == 3.0
    assert lat["inputs"] == 12 and len(lat["round_ratios"]) == 2
    assert lat["ratio"] == pytest.approx(lat["dynamic"]["mean_ms"] / lat["full"]["mean_ms"])
    dyn.threshold = None  # never confident enough: always all members
    assert dyn.compare_latency(x, rounds=1, warmup=0)["dynamic"]["avg_members"] == 3.0
    with pytest.raises(RunnerError):
        dyn.compare_latency(x[:0])
