"""Audio: numpy/torch log-mel parity, audio data specs (real folders + generated fixtures),
augmentations, ONNX front-end metadata and the device runner on a wav file."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_util import subprocess_env
import soundfile as sf
import torch

from edgec.audio import (
    Compose,
    DeviceSimulation,
    LogMel,
    NoiseMix,
    SpecAugment,
    TimeShift,
    device_responses,
    generated_noise_bank,
    simulate_device_split,
)
from edgec.data.fsdd import fsdd_index
from edgec.data.speechcommands import SPEECHCOMMANDS_CLASSES, speechcommands_index, speechcommands_speaker
from edgec.data.tau2020 import TAU2020_LAYOUT
from edgec.data import load_data
from edgec.export.metadata import read_model_metadata, write_model_metadata
from edgec.errors import DataError
from edgec.runtime import audio as ra

REPO = Path(__file__).resolve().parent.parent
# float32 torch.stft vs float64 numpy, in the log-mel domain: the weakest mel bands (power near the
# 1e-6 floor) move by up to ~1e-3 (measured 1.0e-3 on Speech Commands, 5.6e-4 on a pure tone);
# bands holding energy (log-mel > -5) by < 4e-5; the mean over all bins is ~1e-6 (real) / 3e-5 (tone)
ATOL_LOGMEL = 3e-3
ATOL_LOGMEL_ENERGY = 1e-4
MEAN_TOL_LOGMEL = 1e-4


def _assert_logmel_close(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a - b)
    assert diff.max() < ATOL_LOGMEL and diff.mean() < MEAN_TOL_LOGMEL, (diff.max(), diff.mean())
    energy = a > -5.0
    assert energy.mean() > 0.05 and diff[energy].max() < ATOL_LOGMEL_ENERGY, diff[energy].max()


pytestmark = pytest.mark.usefixtures("private_cache")




def _tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _mel_band_of(freq: float, cfg: ra.LogMelConfig) -> int:
    """The mel filter with the largest weight at ``freq``."""
    fb = ra.mel_filterbank(cfg)
    k = int(round(freq / (cfg.sample_rate / cfg.n_fft)))
    return int(fb[:, k].argmax())


# ------------------------------------------------------------------------------------ front end
def test_one_second_gives_101_frames_and_shapes():
    cfg = ra.LogMelConfig()
    assert cfg.shape == (1, 40, 101) and cfg.clip_samples == 16000
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    assert ra.log_mel(wave, cfg).shape == (1, 40, 101)
    assert ra.log_mel(np.stack([wave, wave]), cfg).shape == (2, 1, 40, 101)
    assert LogMel(cfg)(torch.from_numpy(wave)[None]).shape == (1, 1, 40, 101)
    half = ra.LogMelConfig(clip_seconds=0.5)
    assert half.n_frames == 51 and ra.log_mel(wave[:8000], half).shape == (1, 40, 51)
    assert ra.log_mel(np.zeros(16000), cfg).min() == pytest.approx(np.log(1e-6))
    with pytest.raises(ra.AudioError, match="win_length"):
        ra.LogMelConfig(win_length=1024)
    with pytest.raises(ra.AudioError, match="unknown front-end setting"):
        ra.LogMelConfig.from_dict({"n_mel": 40})


def test_mel_filterbank_htk_rows_and_partition_of_unity():
    cfg = ra.LogMelConfig()
    fb = ra.mel_filterbank(cfg)
    assert fb.shape == (40, 257) and fb.min() >= 0 and fb.max() <= 1
    assert ra.hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.1)  # HTK: 1 kHz is ~1000 mel
    np.testing.assert_allclose(ra.mel_to_hz(ra.hz_to_mel([0, 440, 8000])), [0, 440, 8000], atol=1e-9)
    assert ((fb > 0).sum(axis=1) >= 1).all(), "every mel filter covers at least one FFT bin"
    assert fb.max(axis=1).min() > 0.5, "each triangle is sampled near its peak"
    centres = fb.argmax(axis=1)
    assert (np.diff(centres) >= 0).all() and centres[-1] > centres[0]
    # triangles in Hz between mel-spaced points: the filters sum to 1 between the first and
    # last filter centre (partition of unity), 0 above f_max
    pts = ra.mel_to_hz(np.linspace(0, ra.hz_to_mel(8000), 42))
    freqs = np.linspace(0, 8000, 257)
    inside = (freqs >= pts[1]) & (freqs <= pts[-2])
    np.testing.assert_allclose(fb.sum(axis=0)[inside], 1.0, atol=1e-9)
    # row sums grow with the band width (wider triangles at higher frequencies)
    row = fb.sum(axis=1)
    assert row[-1] > 10 * row[0]


def test_numpy_and_torch_logmel_match_on_tone_and_chirp():
    cfg = ra.LogMelConfig()
    t = np.arange(16000) / 16000
    chirp = (0.3 * np.sin(2 * np.pi * (200 * t + 3000 * t**2))).astype(np.float32)
    waves = np.stack([_tone(440.0, 1.0, 16000), chirp])
    a = ra.log_mel(waves, cfg)
    b = LogMel(cfg)(torch.from_numpy(waves)).numpy()
    _assert_logmel_close(a, b)
    # the tone's energy sits in the mel band of 440 Hz
    assert int(a[0, 0].mean(axis=1).argmax()) == _mel_band_of(440.0, cfg)
    # float64 torch agrees to float32 rounding
    b64 = LogMel(cfg)(torch.from_numpy(waves).double()).numpy()
    assert np.abs(a - b64).max() < 1e-5


def test_numpy_and_torch_logmel_match_on_real_audio(edgec_data):
    sc = edgec_data / "speech_commands_v2_test"
    files = [sorted((sc / lab).glob("*.flac"))[i] for lab in ("yes", "stop", "_silence_", "_unknown_") for i in (0, 7)]
    cfg = ra.LogMelConfig()
    waves = np.stack([ra.load_clip(f, cfg) for f in files])
    fsdd = ra.load_clip(edgec_data / "fsdd" / "recordings" / "7_theo_3.wav", cfg)  # 8 kHz resampled
    waves = np.concatenate([waves, fsdd[None]])
    a = ra.log_mel(waves, cfg)
    b = LogMel(cfg)(torch.from_numpy(waves)).numpy()
    _assert_logmel_close(a, b)


def test_runtime_audio_does_not_import_torch():
    code = ("import sys, numpy as np; import edgec.runtime.audio as a; "
            "a.log_mel(np.ones(16000) * 0.1); import edgec.runtime; "
            "assert 'torch' not in sys.modules, 'runtime audio imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr


def test_wav_read_without_soundfile_and_resampling(tmp_path):
    """A device without soundfile reads PCM wav (stdlib); 8 kHz -> 16 kHz keeps a tone in place."""
    clip = _tone(1000.0, 0.6, 8000)
    sf.write(tmp_path / "c8k.wav", clip, 8000, subtype="PCM_16")
    sf.write(tmp_path / "c16k.wav", _tone(1000.0, 1.2, 16000), 16000, subtype="PCM_16")
    wave, sr = ra.read_audio(tmp_path / "c8k.wav")
    assert sr == 8000 and wave.shape == (4800,)
    up = ra.load_clip(tmp_path / "c8k.wav")
    assert up.shape == (16000,) and np.abs(up[9700:]).max() == 0  # 0.6 s of audio, zeros after
    spec = np.abs(np.fft.rfft(up[1000:9000]))
    assert abs(np.fft.rfftfreq(8000, 1 / 16000)[spec.argmax()] - 1000.0) <= 2.0
    code = ("import sys, numpy as np; sys.modules['soundfile'] = None; import edgec.runtime.audio as a; "
            f"np.save({str(tmp_path / 'f.npy')!r}, a.features_from_file({str(tmp_path / 'c16k.wav')!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), ra.features_from_file(tmp_path / "c16k.wav"), atol=1e-6)


# ------------------------------------------------------------------------------- speech commands
def test_speechcommands_speaker_disjoint_split_real(edgec_data):
    splits = speechcommands_index(edgec_data / "speech_commands_v2_test")
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == 4890
    assert sizes["train"] > 3 * sizes["test"] and sizes["val"] > 200 and sizes["test"] > 200
    speakers = {k: set(v.groups["speaker"].tolist()) for k, v in splits.items()}
    assert not speakers["train"] & speakers["val"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["val"] & speakers["test"]
    for v in splits.values():  # every class in every split
        assert (np.bincount(v.labels, minlength=12) > 0).all()
    assert speechcommands_speaker("backward_0c540988_nohash_0.flac") == "0c540988"
    assert speechcommands_speaker("0c540988_nohash_3.wav") == "0c540988"
    assert speechcommands_speaker("1024.flac") is None


def test_speechcommands_bundle_real_subset_matches_runner_features(edgec_data):
    root = edgec_data / "speech_commands_v2_test"
    b = load_data(f"speechcommands:{root}", max_train=240, max_eval=60)
    assert b.classes == list(SPEECHCOMMANDS_CLASSES) and b.num_classes == 12
    assert b.input_shape == (1, 40, 101) and len(b.train) == 240 and len(b.eval) == 60
    assert b.normalization["frontend"] == ra.LogMelConfig().to_dict() and b.normalization["std"][0] > 0
    assert set(b.groups) == {"speaker", "speaker_seen", "file"} and len(b.groups["speaker"]) == 60
    assert set(b.groups["speaker_seen"]) == {"unseen"}  # the split is speaker-disjoint
    # what the device runner computes from the file is exactly the bundle's sample
    for i in (0, 33):
        x, y = b.eval[i]
        feats = ra.features_from_file(root / b.groups["file"][i], ra.LogMelConfig(), b.normalization)
        np.testing.assert_allclose(x.numpy(), feats, atol=1e-5)
        assert b.groups["file"][i].split("/")[0] == b.classes[int(y)]
    out = b.augment(torch.stack([b.train[i][0] for i in range(8)]), torch.Generator().manual_seed(0))
    assert out.shape == (8, 1, 40, 101) and torch.isfinite(out).all()


def _write_sc_full_layout(root: Path) -> None:
    rng = np.random.default_rng(0)
    for word, speakers in (("yes", "abc"), ("no", "abd"), ("bed", "ce")):
        (root / word).mkdir(parents=True)
        for s in speakers:
            for n in range(2):
                sf.write(root / word / f"{s * 8}_nohash_{n}.wav",
                         (0.1 * rng.standard_normal(12000)).astype(np.float32), 16000, subtype="PCM_16")
    (root / "_background_noise_").mkdir()
    sf.write(root / "_background_noise_" / "white.wav", (0.2 * rng.standard_normal(48000)).astype(np.float32), 16000)
    (root / "validation_list.txt").write_text("yes/cccccccc_nohash_0.wav\nno/dddddddd_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/bbbbbbbb_nohash_0.wav\nyes/bbbbbbbb_nohash_1.wav\nbed/eeeeeeee_nohash_1.wav\n")


def test_speechcommands_full_layout_lists_unknown_and_silence(tmp_path):
    _write_sc_full_layout(tmp_path / "sc")
    splits = speechcommands_index(tmp_path / "sc")
    files = {k: {Path(p).parent.name + "/" + Path(p).name for p in v.paths} for k, v in splits.items()}
    assert files["val"] >= {"yes/cccccccc_nohash_0.wav", "no/dddddddd_nohash_0.wav"}
    assert files["test"] >= {"yes/bbbbbbbb_nohash_0.wav", "bed/eeeeeeee_nohash_1.wav"}
    unk, sil = SPEECHCOMMANDS_CLASSES.index("_unknown_"), SPEECHCOMMANDS_CLASSES.index("_silence_")
    bed = [i for i, p in enumerate(splits["train"].paths) if "/bed/" in p]
    assert bed and (splits["train"].labels[bed] == unk).all()
    assert (splits["train"].labels == sil).sum() >= 1  # cut from _background_noise_
    b = load_data(f"speechcommands:{tmp_path / 'sc'}?eval=val&augment=none")
    assert b.augment is None and len(b.eval) == len(splits["val"])
    silence = [x for x, y in b.train if int(y) == sil]
    assert silence and all(torch.isfinite(x).all() for x in silence)


# ------------------------------------------------------------------------------------------ fsdd
def test_fsdd_real_speaker_split_and_16k(edgec_data):
    root = edgec_data / "fsdd" / "recordings"
    default = fsdd_index(root)
    assert len(default["train"]) == 2700 and len(default["eval"]) == 300  # official: index 0-4
    train = ["george", "jackson", "lucas", "nicolas"]
    b = load_data(f"fsdd:{root}?train_speakers={','.join(train)}", max_train=60, max_eval=40)
    assert b.input_shape == (1, 40, 101) and b.normalization["frontend"]["sample_rate"] == 16000
    assert set(b.groups["speaker"].tolist()) <= {"theo", "yweweler"}
    full = fsdd_index(root, train_speakers=train)
    assert len(full["train"]) == 2000 and len(full["eval"]) == 1000
    assert set(full["train"].groups["speaker"].tolist()) == set(train)
    assert set(full["eval"].groups["speaker"].tolist()) == {"theo", "yweweler"}
    x, y = b.eval[0]
    ref = ra.features_from_file(root / b.groups["file"][0], ra.LogMelConfig(), b.normalization)
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-5)
    assert b.groups["file"][0].startswith(f"{int(y)}_")
    with pytest.raises(DataError, match="did you mean 'theo'"):
        load_data(f"fsdd:{root}?train_speakers=george,thoe")


def test_fsdd_fixture_resampled_tones_and_test_speakers(tmp_path):
    root = tmp_path / "fsdd"
    root.mkdir()
    freqs = {0: 500.0, 1: 2000.0}
    for d, f in freqs.items():
        for spk in ("ann", "bob", "cy"):
            for i in range(6):
                sf.write(root / f"{d}_{spk}_{i}.wav", _tone(f, 0.4 + 0.1 * i, 8000, amp=0.3), 8000, subtype="PCM_16")
    (root / "README.md").write_text("not audio")
    b = load_data(f"fsdd:{root}?test_speakers=cy&standardize=0&augment=none")
    assert len(b.train) == 24 and len(b.eval) == 12 and set(b.groups["speaker"].tolist()) == {"cy"}
    cfg = ra.LogMelConfig()
    for x, y in b.eval:  # 8 kHz file, 16 kHz front end: the tone lands in its own mel band
        assert int(x[0, :, 5:30].mean(axis=1).argmax()) == _mel_band_of(freqs[int(y)], cfg)
    assert b.normalization["mean"] == [0.0] and b.normalization["std"] == [1.0]
    official = load_data(f"fsdd:{root}")
    assert len(official.eval) == 30 and set(official.groups["file"].tolist()) == {
        f"{d}_{s}_{i}.wav" for d in freqs for s in ("ann", "bob", "cy") for i in range(5)}


# ------------------------------------------------------------------------------------- TAU 2020
_TAU_ROWS = [  # (scene, city, location, segment, device, split)
    ("airport", "barcelona", 0, 0, "a", "train"), ("airport", "barcelona", 0, 0, "b", "train"),
    ("airport", "lisbon", 3, 1, "s1", "train"), ("bus", "helsinki", 1, 0, "a", "train"),
    ("bus", "helsinki", 1, 0, "c", "train"), ("park", "paris", 2, 4, "s2", "train"),
    ("airport", "vienna", 5, 2, "a", "evaluate"), ("bus", "prague", 6, 3, "s4", "evaluate"),
    ("park", "milan", 7, 1, "s6", "evaluate"), ("park", "milan", 7, 1, "b", "evaluate"),
]


def _write_tau(root: Path, *, sep: str = "\t") -> None:
    (root / "audio").mkdir(parents=True)
    (root / "evaluation_setup").mkdir()
    rng = np.random.default_rng(0)
    meta = [sep.join(("filename", "scene_label", "identifier", "source_label"))]
    folds = {"train": [sep.join(("filename", "scene_label"))], "evaluate": [sep.join(("filename", "scene_label"))]}
    for scene, city, loc, seg, dev, split in _TAU_ROWS:
        name = f"audio/{scene}-{city}-{loc}-{seg}-{dev}.wav"
        sf.write(root / name, (0.05 * rng.standard_normal(8820)).astype(np.float32), 44100, subtype="PCM_24")
        meta.append(sep.join((name, scene, f"{city}-{loc}", dev if dev in "abc" else "a")))
        folds[split].append(sep.join((name, scene)))
    (root / "meta.csv").write_text("\n".join(meta) + "\n")
    for split, lines in folds.items():
        (root / "evaluation_setup" / f"fold1_{split}.csv").write_text("\n".join(lines) + "\n")


def test_tau2020mobile_fixture_devices_and_cache(tmp_path, monkeypatch):
    root = tmp_path / "TAU-urban-acoustic-scenes-2020-mobile-development"
    _write_tau(root)
    cache = Path(os.environ["EDGEC_CACHE"])
    b = load_data(f"tau2020mobile:{root}")
    assert b.classes == ["airport", "bus", "park"] and b.num_classes == 3
    assert b.input_shape == (1, 80, 431)  # 10 s at 44.1 kHz, hop 1024, 80 mels
    assert len(b.train) == 6 and len(b.eval) == 4
    assert b.groups["device"].tolist() == ["a", "s4", "s6", "b"]
    assert b.groups["city"].tolist() == ["vienna", "prague", "milan", "milan"]
    assert b.groups["identifier"].tolist() == ["vienna-5", "prague-6", "milan-7", "milan-7"]
    assert [int(y) for _, y in b.eval] == [0, 1, 2, 2]
    assert isinstance(b.augment, SpecAugment)
    written = sorted(cache.glob("audio-tau2020mobile-*.npy"))
    assert len(written) == 2 and not list(cache.glob("*.tmp"))
    stamp = [p.stat().st_mtime_ns for p in written]
    # served from the cache: no clip is decoded again (was a wall-clock bound, which a loaded machine breaks)
    import edgec.data.audio as audio_data

    def no_decode(*args, **kwargs):
        raise AssertionError("a cached split was decoded again")

    with monkeypatch.context() as m:
        m.setattr(audio_data, "_compute_features", no_decode)
        again = load_data(f"tau2020mobile:{root}")
    assert [p.stat().st_mtime_ns for p in written] == stamp, "second load is served from the cache"
    assert torch.equal(again.eval.tensors[0], b.eval.tensors[0])
    short = load_data(f"tau2020mobile:{root}?clip_seconds=1&sample_rate=16000&n_fft=512&win_length=480"
                      "&hop_length=160&n_mels=40&augment=device+specaugment")
    assert short.input_shape == (1, 40, 101) and len(list(cache.glob("audio-tau2020mobile-*.npy"))) == 4
    assert isinstance(short.augment, Compose) and isinstance(short.augment.augments[0], DeviceSimulation)


def test_tau2020mobile_bad_layouts_say_the_expected_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_data(f"tau2020mobile:{tmp_path / 'empty'}")
    assert "evaluation_setup/fold1_train.csv" in str(e.value) and TAU2020_LAYOUT in str(e.value)
    _write_tau(tmp_path / "commas", sep=",")
    with pytest.raises(DataError, match="tab-separated") as e:
        load_data(f"tau2020mobile:{tmp_path / 'commas'}")
    assert "meta.csv" in str(e.value)
    _write_tau(tmp_path / "missing")
    (tmp_path / "missing" / "audio" / "bus-prague-6-3-s4.wav").unlink()
    with pytest.raises(DataError, match="missing, e.g.*bus-prague-6-3-s4.wav"):
        load_data(f"tau2020mobile:{tmp_path / 'missing'}")
    _write_tau(tmp_path / "dev")
    fold = tmp_path / "dev" / "evaluation_setup" / "fold1_evaluate.csv"
    fold.write_text(fold.read_text().replace("-b.wav", "-x9.wav"))
    with pytest.raises(DataError, match="cannot read the device"):
        load_data(f"tau2020mobile:{tmp_path / 'dev'}")
    with pytest.raises(DataError, match="did you mean 'fold'"):
        load_data(f"tau2020mobile:{tmp_path / 'dev'}?folds=1")


def test_speechcommands_and_fsdd_bad_layouts(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "x.wav").write_bytes(b"")
    with pytest.raises(DataError, match="not a Speech Commands folder") as e:
        load_data(f"speechcommands:{tmp_path}")
    assert "PATH/<label>/<speaker>_nohash_<n>.wav" in str(e.value)
    with pytest.raises(DataError, match=r"no <digit>_<speaker>_<index>\.wav files") as e:
        load_data(f"fsdd:{tmp_path}")
    assert "3_theo_12.wav" in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"fsdd:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="unknown augmentation"):
        load_data(f"speechcommands:{tmp_path}?augment=mixup")  # options are checked before the folder


# --------------------------------------------------------------------------------- augmentations
def _batch(n: int = 6, f: int = 40, t: int = 101) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, 1, f, t, generator=g) * 2.0 - 1.0


def test_augmentations_deterministic_and_shape_preserving():
    x = _batch()
    bank = generated_noise_bank(ra.LogMelConfig(), n=4)
    augs = [TimeShift(10), NoiseMix(bank, p=1.0, mean=-1.0, std=2.0), SpecAugment(2, 5, 2, 10),
            DeviceSimulation(40, 6, devices=[0, 1, 2], std=2.0)]
    augs.append(Compose(list(augs)))
    for aug in augs:
        a = aug(x.clone(), torch.Generator().manual_seed(7))
        b = aug(x.clone(), torch.Generator().manual_seed(7))
        c = aug(x.clone(), torch.Generator().manual_seed(8))
        assert a.shape == x.shape and a.dtype == x.dtype, aug
        assert torch.equal(a, b), f"{aug!r} not deterministic under a seed"
        assert not torch.equal(a, x) and not torch.equal(a, c), aug
        assert torch.isfinite(a).all()
    import pickle

    assert repr(pickle.loads(pickle.dumps(augs[-1]))) == repr(augs[-1])


def test_time_shift_moves_frames_and_fills_low():
    x = _batch()
    out = TimeShift(10)(x, torch.Generator().manual_seed(1))
    for i in range(x.shape[0]):
        lo = x[i].min()
        found = []
        for s in range(-10, 11):
            ref = torch.full_like(x[i], float(lo))
            if s >= 0:
                ref[..., s:] = x[i][..., : x.shape[-1] - s]
            else:
                ref[..., :s] = x[i][..., -s:]
            if torch.equal(out[i], ref):
                found.append(s)
        assert len(found) == 1


def test_spec_augment_masks_with_the_mean():
    x = _batch()
    out = SpecAugment(freq_masks=1, freq_width=6, time_masks=1, time_width=12)(x, torch.Generator().manual_seed(3))
    changed = out != x
    for i in range(x.shape[0]):
        m = x[i].mean()
        assert torch.allclose(out[i][changed[i]], m.expand(int(changed[i].sum())))
        rows = changed[i, 0].all(dim=1).sum()
        cols = changed[i, 0].all(dim=0).sum()
        assert rows <= 6 and cols <= 12


def test_noise_mix_snr_in_power_domain():
    cfg = ra.LogMelConfig()
    clean = ra.log_mel(np.stack([_tone(300.0 * (k + 1), 1.0, 16000, 0.2) for k in range(4)]), cfg)
    mean, std = -2.0, 3.0
    x = torch.from_numpy((clean - mean) / std)
    for snr in (0.0, 10.0, 20.0):
        out = NoiseMix(generated_noise_bank(cfg, n=3), p=1.0, snr_db=(snr, snr), mean=mean, std=std)(
            x, torch.Generator().manual_seed(0))
        p_in = np.exp(clean.astype(np.float64)) - 1e-6
        p_out = np.exp(out.numpy().astype(np.float64) * std + mean) - 1e-6
        ratio = (p_out - p_in).sum(axis=(1, 2, 3)) / p_in.sum(axis=(1, 2, 3))
        np.testing.assert_allclose(10 * np.log10(1 / ratio), snr, atol=0.05)
        assert (out >= x - 1e-4).all()  # adding power never lowers a band
    kept = NoiseMix(generated_noise_bank(cfg, n=2), p=0.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(kept, x)
    with pytest.raises(ValueError, match="silent"):
        NoiseMix(np.full((2, 40, 101), np.log(1e-6)))


def test_device_simulation_and_seen_unseen_split():
    gains = device_responses(6, 40, seed=0)
    assert gains.shape == (6, 40) and np.abs(gains.mean(axis=1)).max() < 1e-9
    step = np.abs(np.diff(gains, axis=1))
    assert np.abs(gains).max() > 1.0 and step.max() < 5.0  # not flat; no jumps between adjacent bands
    assert (step.mean(axis=1) / gains.std(axis=1)).max() < 0.5  # smooth (white noise: ~1.1)
    np.testing.assert_array_equal(device_responses(3, 40, seed=0), gains[:3])  # adding devices keeps the old
    assert not np.allclose(device_responses(6, 40, seed=1), gains)
    sim = DeviceSimulation(40, 6, devices=[0, 1, 2], p=1.0, std=2.0)
    x = _batch(8).numpy()
    out = sim(torch.from_numpy(x), torch.Generator().manual_seed(0)).numpy()
    shifts = (out - x)[:, 0, :, 0]  # one log-gain per band, same for every frame
    np.testing.assert_allclose(out - x, np.broadcast_to(shifts[:, None, :, None], x.shape), atol=1e-5)
    seen = gains[:3] * np.log(10) / 10 / 2.0
    for row in shifts:
        assert min(np.abs(row - g).max() for g in seen) < 1e-5
    xs, ids = simulate_device_split(x, sim, [0, 1, 2, 3, 4, 5])
    assert xs.shape == (48, 1, 40, 101) and ids.tolist() == sum(([d] * 8 for d in range(6)), [])
    np.testing.assert_allclose(xs[40:] - x, np.broadcast_to(
        (gains[5] * np.log(10) / 10 / 2.0)[None, None, :, None], x.shape), atol=1e-5)
    xa, ida = simulate_device_split(x, sim, [3, 4], seed=1)
    assert xa.shape == x.shape and sorted(ida.tolist()) == [3] * 4 + [4] * 4
    xb, idb = simulate_device_split(x, sim, [3, 4], seed=1)
    assert np.array_equal(ida, idb) and np.array_equal(xa, xb)


# ------------------------------------------------------------------------------ runner + metadata
class _KWSNet(torch.nn.Module):
    def __init__(self, n_classes: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, n_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_runner_classifies_wav_and_flac_end_to_end(tmp_path):
    torch.manual_seed(0)
    net = _KWSNet().eval()
    path = tmp_path / "kws.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 1, 40, 101),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    classes = ["yes", "no", "_silence_", "_unknown_"]
    norm = {"mean": [-2.5], "std": [4.0], "features": "logmel", "frontend": ra.LogMelConfig().to_dict()}
    # a model without front-end metadata cannot take audio: the runner says how to fix it
    sf.write(tmp_path / "clip.wav", _tone(700.0, 0.7, 8000, 0.3), 8000, subtype="PCM_16")
    proc = subprocess.run([sys.executable, "-m", "edgec.runtime", str(path), "--input", str(tmp_path / "clip.wav")],
                          capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 2 and "write_model_metadata" in proc.stderr

    import onnx

    m = onnx.load(str(path))
    m.metadata_props.add(key="author", value="test")
    onnx.save(m, str(path))
    written = write_model_metadata(path, classes=classes, normalization=norm)
    assert set(written) == {"edgec.classes", "edgec.frontend", "edgec.normalization"}
    meta = read_model_metadata(path)
    assert meta == {"classes": classes, "frontend": norm["frontend"], "normalization": {"mean": [-2.5], "std": [4.0]}}
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["author"] == "test"
    onnx.checker.check_model(str(path))

    rng = np.random.default_rng(0)
    sf.write(tmp_path / "noise.flac", (0.2 * rng.standard_normal(20000)).astype(np.float32), 16000)
    for clip in ("clip.wav", "noise.flac"):
        proc = subprocess.run([sys.executable, "-m", "edgec.runtime", str(path), "--input", str(tmp_path / clip),
                               "--topk", "2"], capture_output=True, text=True, env=subprocess_env())
        assert proc.returncode == 0, proc.stderr
        header, row = proc.stdout.strip().splitlines()
        assert header == "# sample\tclass1\tlabel1\tprob1\tclass2\tlabel2\tprob2"
        cells = row.split("\t")
        # reference: torch front end on the same pad/resampled clip, standardised, then the net
        wave = torch.from_numpy(ra.load_clip(tmp_path / clip))[None]
        with torch.no_grad():
            probs = torch.softmax(net((LogMel()(wave) + 2.5) / 4.0), dim=1)[0].numpy()
        order = np.argsort(-probs)
        assert [int(cells[1]), int(cells[4])] == order[:2].tolist()
        assert [cells[2], cells[5]] == [classes[order[0]], classes[order[1]]]
        np.testing.assert_allclose([float(cells[3]), float(cells[6])], probs[order[:2]], atol=1e-4)

    # on a device: the runtime/ folder copied alone, no edgec package, no torch
    import shutil

    shutil.copytree(REPO / "edgec" / "runtime", tmp_path / "dev" / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import runpy, sys; sys.argv = ['runtime', sys.argv[1], '--input', sys.argv[2]];"
            "sys.modules['edgec'] = None; sys.modules['torch'] = None;"
            "runpy.run_module('runtime', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    dev = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "noise.flac")],
                         capture_output=True, text=True, cwd=tmp_path / "dev", env=env)
    assert dev.returncode == 0, dev.stderr
    assert dev.stdout.strip().splitlines()[1].split("\t")[:3] == proc.stdout.strip().splitlines()[1].split("\t")[:3]
