"""``fxstream generate``: a saved tiny pipeline in, a playable video out (read back), peak memory and time
printed; one-line errors with exit status 2 for arguments the pipeline cannot take."""

from __future__ import annotations

import re

import imageio.v3 as iio
import numpy as np
import PIL.Image
import pytest

from fxstream import cli, generate, pipelines

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--frames", "4", "--height", "64", "--width", "64", "--steps", "2"]
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    folders = {}
    for name in ("svd", "animatediff"):
        folder = tmp_path_factory.mktemp(name)
        pipelines.build(name).save_pretrained(folder)
        folders[name] = str(folder)
    return folders


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("image") / "in.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _bytes(text: str) -> int:
    number, unit = text.split()
    return round(float(number) * _UNITS[unit])


def _peak(out: str) -> tuple[int, int, int]:
    """(total, weights, activations) from the printed peak-memory line."""
    m = re.search(r"^peak memory: (.+?) \(weights (.+?) \+ activations (.+?);", out, re.MULTILINE)
    assert m, out
    return tuple(_bytes(g) for g in m.groups())


def _read_video(path: str) -> np.ndarray:
    if path.endswith(".mp4"):
        import imageio.v2

        with imageio.v2.get_reader(path, format="FFMPEG") as reader:
            # a comprehension, not list(reader): the reader's length is infinite, and list() preallocates it
            return np.stack([frame for frame in reader])
    return iio.imread(path, index=None)


def test_svd_video_and_peak_memory(saved, image, tmp_path, capsys):
    # Eager first, for the peak to compare with; an .mp4 comes back as .gif where ffmpeg is missing.
    gif = str(tmp_path / "eager.gif")
    code, out, err = run(capsys, ["--model", saved["svd"], "--image", image, *SMALL, "--eager", "--out", gif])
    assert code == 0, err
    _, _, eager = _peak(out)

    mp4 = str(tmp_path / "video.mp4")
    code, out, err = run(capsys, ["--model", saved["svd"], "--image", image, *SMALL, "--budget-gb", "min",
                                  "--out", mp4])
    assert code == 0, err
    assert "StableVideoDiffusionPipeline: 4 frames 64x64, 2 steps, fp32 on cpu, minimum memory" in err
    written = re.search(r"^wrote (\S+):", out, re.MULTILINE).group(1)
    assert written in (mp4, mp4[:-4] + ".gif")
    video = _read_video(written)
    assert video.shape == (4, 64, 64, 3) and video.dtype == np.uint8
    assert np.ptp(video) > 0  # a real picture, not a blank

    total, weights, activations = _peak(out)
    assert abs(total - weights - activations) <= 0.01 * total
    assert weights > 0 and 0 < activations < eager  # sliced: less than the eager pipeline, both measured
    assert re.search(r"^time: [\d.]+ s \(compiling [\d.]+ s, generating [\d.]+ s\)$", out, re.MULTILINE)
    assert "vae.decoder" in out and "unet" in out  # the per-component plan report


def test_text_pipeline_gif(saved, tmp_path, capsys):
    gif = str(tmp_path / "fox.gif")
    code, out, err = run(capsys, ["--model", saved["animatediff"], "--prompt", "a fox", *SMALL, "--eager",
                                  "--decode-chunk-size", "3", "--seed", "1", "--out", gif])
    assert code == 0, err
    assert re.search(r"^wrote .*fox\.gif: 4 frames 64x64$", out, re.MULTILINE)
    assert _read_video(gif).shape[1:] == (64, 64, 3)
    assert re.search(r"^time: [\d.]+ s$", out, re.MULTILINE)


def test_the_default_budget_fits_the_device(saved, tmp_path, capsys):
    # budget auto: what this machine's RAM holds, printed; the tiny pipeline fits it unsliced.
    gif = str(tmp_path / "auto.gif")
    code, out, err = run(capsys, ["--model", saved["animatediff"], "--prompt", "a fox", *SMALL, "--out", gif])
    assert code == 0, err
    chosen = re.search(r"^fxstream: budget auto: ([\d.]+) GiB", err, re.MULTILINE)
    assert chosen and float(chosen.group(1)) > 1
    assert re.search(r"fp32 on cpu, budget [\d.]+ GiB \(auto\)$", err, re.MULTILINE)
    rows = [line for line in out.splitlines() if line.startswith(("| unet", "| vae.decoder"))]
    assert len(rows) == 2 and all(line.rstrip(" |").endswith(" 0") for line in rows)  # nothing sliced


def test_rehash_auto_reports_full_steps(saved, tmp_path, capsys):
    gif = str(tmp_path / "rehash.gif")
    code, out, err = run(capsys, ["--model", saved["animatediff"], "--prompt", "a fox", *SMALL, "--steps", "5",
                                  "--rehash", "auto", "--out", gif])
    assert code == 0, err
    # every other step, and the last: 0, 2, 4
    m = re.search(r"^rehash: 3 of 5 steps full \(steps 0, 2, 4\); cache point (\S+), (\d+)% of the UNet's FLOPs "
                  r"skipped", out, re.MULTILINE)
    assert m, out
    assert m.group(1).startswith("up_blocks.") and int(m.group(2)) > 50
    assert _read_video(gif).shape == (4, 64, 64, 3)


def test_mp4_without_ffmpeg_writes_gif(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "imageio_ffmpeg", None)  # import fails: no ffmpeg
    frames = np.random.default_rng(0).integers(0, 255, (3, 16, 24, 3), dtype=np.uint8)
    written = generate._video_path(str(tmp_path / "v.mp4"))  # decided before writing: one name in every line
    assert written == str(tmp_path / "v.gif")
    assert generate._write_video(written, frames, fps=8) == written
    assert _read_video(written).shape == (3, 16, 24, 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{tmp}/missing", "--image", "{image}"], "no such pipeline folder"),
        (["--model", "{tmp}", "--image", "{image}"], "not a diffusers pipeline folder"),
        (["--model", "{svd}", "--image", "{tmp}/missing.png"], "cannot read image .*No such file"),
        (["--model", "{svd}", "--image", "{svd}/model_index.json"], "cannot read image"),
        (["--model", "{svd}", "--prompt", "a fox"], "pass --image, not --prompt"),
        (["--model", "{animatediff}", "--image", "{image}"], "pass --prompt, not --image"),
        (["--model", "{svd}", "--image", "{image}", "--height", "72"], "--height: .* multiple of 16 pixels"),
        (["--model", "{animatediff}", "--prompt", "a", "--frames", "33"], "at most 32 frames"),
        (["--model", "{svd}", "--image", "{image}", "--budget-gb", "1e-6"], "does not cover the weights"),
        (["--model", "{svd}", "--image", "{image}", "--out", "{tmp}/v.avi"], "expected a .mp4 or .gif"),
        (["--model", "{svd}", "--image", "{image}", "--out", "{tmp}/no/v.gif"], "cannot write"),
        (["--model", "{svd}", "--image", "{image}", "--dtype", "bf16"], "invalid choice"),
        (["--model", "{svd}", "--image", "{image}", "--rehash", "sometimes"], "--rehash: expected auto, off"),
        (["--model", "{svd}", "--image", "{image}", "--rehash", "{tmp}/r.json"], "--rehash: no such file"),
        (["--model", "{svd}", "--image", "{image}", "--eager", "--rehash", "auto"], "not with --eager"),
    ],
)
def test_errors(saved, image, tmp_path, capsys, argv, message):
    names = dict(tmp=str(tmp_path), image=image, **saved)
    argv = [a.format(**names) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "v.gif")]
    code, out, err = run(capsys, argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("fxstream: error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert not (tmp_path / "v.gif").exists()


def test_help_lists_generate(capsys):
    assert cli.main(["generate"]) == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert cli.main(["generate", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--model", "--image", "--prompt", "--budget-gb", "--dtype", "--device", "--out"):
        assert option in help_text


def _centroids(video: np.ndarray) -> np.ndarray:
    """(frames, 2) x, y centroid of the pixels that differ from each frame's background (its median colour)."""
    out = []
    for frame in video.astype(np.float32):
        background = np.median(frame.reshape(-1, 3), axis=0)
        weight = np.abs(frame - background).sum(axis=-1)
        weight = np.where(weight > 0.5 * weight.max(), weight, 0.0)
        ys, xs = np.indices(weight.shape)
        out.append([(weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()])
    return np.asarray(out)


def test_the_builtin_demo_makes_a_video_of_moving_shapes(tmp_path, capsys):
    # No --model: fxstream's own trained reference UNet and decoder, offline. The shapes must move.
    gif = str(tmp_path / "demo.gif")
    code, out, err = run(capsys, ["--out", gif])
    assert code == 0, err
    assert "built-in demo: shapes moving right, 8 frames 128x128, 25 steps" in err
    assert re.search(r"^wrote .*demo\.gif: 8 frames 128x128$", out, re.MULTILINE)
    video = iio.imread(gif, index=None)
    assert video.shape[0] >= 8 and video.shape[1:] == (128, 128, 3)
    path = _centroids(video)
    assert np.linalg.norm(path[-1] - path[0]) >= 10, path  # pixels, of 128
    assert re.search(r"^time: [\d.]+ s \(compiling", out, re.MULTILINE)


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "a fox", "--out", "x.gif"], "names the direction its shapes move"),
    (["--frames", "16", "--out", "x.gif"], "the built-in demo is 8 frames 128x128"),
    (["--image", "in.png", "--out", "x.gif"], "the built-in demo takes --prompt"),
])
def test_builtin_demo_argument_errors(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    code, _, err = run(capsys, argv)
    assert code == 2 and match in err and err.count("\n") == 1
