"""The commands end to end on real MNIST images with the tiny CPU preset."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from imgcluster import precision
from imgcluster.cli import app
from imgcluster.config import pick_method, pick_preset

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def files_under(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def trained(mnist_200, tmp_path_factory):
    """One tiny run (20 steps) shared by the read-only checks below."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = run("train", mnist_200, "--clusters", 10, "--preset", "cpu-tiny", "--steps", 20, "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    return out


def test_train_writes_every_file_of_the_run_directory(trained, mnist_200):
    for name in ("config.yaml", "model.safetensors", "checkpoint/state.safetensors", "metrics.jsonl",
                 "assignments.csv", "bad_images.csv"):
        assert (trained / name).is_file(), name
    assert sorted(p.name for p in (trained / "samples").iterdir()) == ["step-0000010.png", "step-0000020.png"]
    sheets = sorted(p.name for p in (trained / "sheets").iterdir())
    assert sheets == [f"cluster-{k:03d}.png" for k in range(10)]
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["method"] == "c3gan" and cfg["clusters"] == 10 and cfg["image_size"] == 16
    assert cfg["c3gan"]["ngf"] == 16 and "torch" in cfg["versions"]
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10, 15, 20]
    assert {"d_loss", "g_loss", "images_per_s", "elapsed_s"} <= set(lines[0])
    with open(trained / "assignments.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == files_under(mnist_200) == 200
    assert all(0 <= int(r["cluster"]) < 10 and 0 < float(r["confidence"]) <= 1 for r in rows)


def test_losses_move_during_training(trained):
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["d_loss"] != lines[-1]["d_loss"] and lines[0]["g_loss"] != lines[-1]["g_loss"]


def test_model_file_carries_format_and_config(trained):
    from safetensors import safe_open

    with safe_open(str(trained / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "imgcluster-model" and meta["format_version"] == "1"
    assert meta["method"] == "c3gan" and yaml.safe_load(meta["config"])["clusters"] == 10


def test_assign_prints_one_row_per_file(trained, mnist_200):
    result = run("assign", trained)
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == files_under(mnist_200)
    assert list(rows[0]) == ["path", "cluster", "confidence", "error"]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    # the same model gives the same answers as the CSV written at the end of training
    with open(trained / "assignments.csv") as f:
        assert [r["cluster"] for r in csv.DictReader(f)] == [r["cluster"] for r in rows]


def test_assign_in_bf16_keeps_every_row_and_nearly_every_cluster(trained, mnist_200, monkeypatch):
    """`assign --precision bf16` runs the model under bf16 autocast (the confidences change) and gives a row
    per file; only near ties may change cluster. The run trained in fp32 (`auto` on a CPU), so that is
    what `assign` uses by default, and it says where bf16 would be faster."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    default = run("assign", trained)
    assert default.exit_code == 0 and "--precision bf16 runs the model about 2x faster" in default.stderr
    rows = {}
    for name in ("fp32", "bf16"):
        result = run("assign", trained, "--precision", name)
        assert result.exit_code == 0, result.stderr
        assert "--precision bf16" not in result.stderr          # asked explicitly: no advice
        rows[name] = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows["fp32"] == list(csv.DictReader(io.StringIO(default.stdout)))
    fp32, bf16 = rows["fp32"], rows["bf16"]
    assert [r["path"] for r in bf16] == [r["path"] for r in fp32] and len(bf16) == files_under(mnist_200)
    assert [r["confidence"] for r in bf16] != [r["confidence"] for r in fp32]
    same = sum(a["cluster"] == b["cluster"] for a, b in zip(fp32, bf16))
    assert same >= 0.9 * len(fp32)
    result = run("assign", trained, "--precision", "fp16")
    assert result.exit_code == 2 and "--precision: must be one of auto, bf16, fp32, got 'fp16'" in result.stderr


def test_assign_jsonl_and_sheets(trained, tmp_path):
    result = run("assign", trained, "--format", "jsonl", "-o", tmp_path / "a.jsonl", "--sheets", tmp_path / "sheets")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(lines) == 200 and set(lines[0]) == {"path", "cluster", "confidence", "error"}
    assert len(list((tmp_path / "sheets").glob("cluster-*.png"))) == 10


def test_generate_one_cluster_and_all(trained, tmp_path):
    result = run("generate", trained, "--cluster", 3, "-n", 4, "-o", tmp_path / "c3.png")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "c3.png")
    w, h = Image.open(tmp_path / "c3.png").size
    assert (w, h) == (4 * 17 + 1, 17 + 1)                  # 4 tiles of 16 px with 1 px padding
    result = run("generate", trained, "--all", "-n", 2, "-o", tmp_path / "each")
    assert result.exit_code == 0
    assert len(result.stdout.split()) == 20 == len(list((tmp_path / "each").glob("*.png")))


def test_generate_is_reproducible(trained, tmp_path):
    run("generate", trained, "--cluster", 1, "-o", tmp_path / "a.png", "--seed", 5)
    run("generate", trained, "--cluster", 1, "-o", tmp_path / "b.png", "--seed", 5)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_evaluate_from_folders_and_labels_csv(trained, mnist_200, tmp_path):
    result = run("evaluate", trained, "--labels-from-folders", "--json")
    assert result.exit_code == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["n"] == 200 and scores["classes"] == 10
    for key in ("acc", "nmi", "nmi_max", "ari", "purity"):
        assert 0 <= scores[key] <= 1 or key == "ari"
    # a labels CSV in the shared sets' layout (paths from the set's root) matches by suffix
    labels = tmp_path / "labels.csv"
    with open(labels, "w") as f:
        f.write("path,label\n")
        for p in sorted(mnist_200.rglob("*.png")):
            f.write(f"images/{p.relative_to(mnist_200).as_posix()},{p.parent.name}\n")
    again = json.loads(run("evaluate", trained / "assignments.csv", "--labels", labels, "--json").stdout)
    assert again["acc"] == scores["acc"] and again["n"] == 200
    table = run("evaluate", trained, "--labels-from-folders")
    assert table.exit_code == 0 and table.stdout == "" and "NMI" in table.stderr


def test_evaluate_does_not_load_torch(trained):
    """Scoring reads two CSV files and config.yaml: it must not pay torch's import time (seconds)."""
    code = ("import sys; from imgcluster.cli import app\n"
            f"try: app(['evaluate', {str(trained)!r}, '--labels-from-folders', '--json'])\n"
            "except SystemExit as e: assert e.code in (0, None), e.code\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n"] == 200
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_loading_a_model_does_not_import_sympy(trained):
    """Torch's meta-tensor code imports sympy on first use: 0.5-0.9 s of every `assign` of a C3-GAN run
    (the `trained` run) when its networks were built on the meta device and allocated with
    Module.to_empty. They are now built on the CPU, uninitialised (slcGAN's clustering network imports
    torchvision, which imports sympy anyway)."""
    code = ("import sys, torch; from pathlib import Path; from imgcluster import rundir\n"
            "before = 'sympy' in sys.modules\n"
            f"cfg, method = rundir.load_model(rundir.RunDir(Path({str(trained)!r})), torch.device('cpu'))\n"
            "assert all(not p.is_meta for n in method.networks().values() for p in n.state_dict().values())\n"
            "print(before, 'sympy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split()
    if before == "True":
        pytest.skip("this torch imports sympy on its own")
    assert after == "False"


def test_resume_continues_at_the_saved_step(trained, mnist_200, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    result = run("train", mnist_200, "--out", copy, "--steps", 30)
    assert result.exit_code == 0, result.stderr
    assert "resuming" in result.stderr
    logged = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [5, 10, 15, 20, 25, 30]
    # Not a terminal: plain progress lines, the last one at 30/30 with the clusters of the last logged steps.
    used = logged[-1]["clusters_in_batch"]
    last = [x for x in result.stderr.splitlines() if x.startswith("training: ")][-1]
    assert last.startswith("training: 30/30 (100%) D ") and f" {used:.1f}/10 clusters per batch " in last, last


def test_resumed_run_equals_uninterrupted_run(mnist_200, tmp_path):
    common = ["--clusters", 10, "--preset", "cpu-tiny", "--quiet", "--seed", 3, "--set", "checkpoint_every=7"]
    assert run("train", mnist_200, *common, "--steps", 16, "--out", tmp_path / "whole").exit_code == 0
    assert run("train", mnist_200, *common, "--steps", 9, "--out", tmp_path / "split").exit_code == 0
    assert run("train", mnist_200, *common, "--steps", 16, "--out", tmp_path / "split").exit_code == 0
    whole = load_file(tmp_path / "whole" / "checkpoint" / "state.safetensors")
    split = load_file(tmp_path / "split" / "checkpoint" / "state.safetensors")
    assert whole.keys() == split.keys()
    for key in whole:
        assert (whole[key] == split[key]).all(), key
    metrics = lambda run_dir: [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Losses logged after the first full window past the resume point are the same, digit for digit
    # (the split run also logged its last step, 9, so the 6-10 window differs in what it averages).
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")}
                          for r in rows if r["step"] > 10]
    assert strip(metrics(tmp_path / "whole")) == strip(metrics(tmp_path / "split"))
    assert [r["step"] for r in metrics(tmp_path / "split")] == [5, 9, 10, 15, 16]


def test_resume_refuses_other_settings(trained, mnist_200):
    result = run("train", mnist_200, "--out", trained, "--clusters", 12)
    assert result.exit_code == 2
    assert "clusters" in result.stderr and "--restart" in result.stderr


def test_resume_refuses_another_method(trained, mnist_200):
    result = run("train", mnist_200, "--out", trained, "--method", "slcgan")
    assert result.exit_code == 2
    assert "trained with c3gan, not slcgan" in result.stderr and "--restart" in result.stderr


def test_method_flag_conflicting_with_the_preset_is_refused(mnist_200, tmp_path):
    result = run("train", mnist_200, "--clusters", 5, "--method", "slcgan", "--preset", "cpu-tiny",
                 "--out", tmp_path / "r", "--dry-run")
    assert result.exit_code == 2
    assert "--method slcgan conflicts with preset cpu-tiny" in result.stderr
    # a preset names its method: no --method needed
    result = run("train", mnist_200, "--clusters", 5, "--preset", "slcgan-tiny", "--out", tmp_path / "r", "--dry-run")
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["method"] == "slcgan"


def test_without_preset_one_is_picked_from_the_folder(mnist_200, tmp_path):
    """28 px MNIST digits -> slcGAN's 32 px CPU preset on a CPU; large images -> C3-GAN at 128;
    --image-size and --method steer it."""
    result = run("train", mnist_200, "--clusters", 5, "--out", tmp_path / "r", "--dry-run", "--device", "cpu")
    assert result.exit_code == 0
    assert "no --method given: using slcgan (typical image 28 px" in result.stderr
    assert "using slcgan-32-cpu" in result.stderr and "typical image 28 px, on a CPU" in result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["image_size"] == 32 and cfg["method"] == "slcgan" and cfg["slcgan"]["c_width"] == 16
    result = run("train", mnist_200, "--clusters", 5, "--method", "c3gan", "--out", tmp_path / "r", "--dry-run",
                 "--device", "cpu")
    assert "no --method given" not in result.stderr
    assert "using c3gan-32-cpu" in result.stderr and yaml.safe_load(result.stdout)["c3gan"]["ngf"] == 32
    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):
        Image.new("RGB", (400, 300), (i * 60, 90, 30)).save(big / f"{i}.jpg")
    result = run("train", big, "--clusters", 2, "--method", "slcgan", "--out", tmp_path / "b", "--dry-run",
                 "--device", "cpu")
    assert "using slcgan-128 (3 files, typical image 300 px; a GPU preset: slow on a CPU)" in result.stderr
    assert yaml.safe_load(result.stdout)["image_size"] == 128
    result = run("train", big, "--clusters", 2, "--out", tmp_path / "b", "--dry-run", "--device", "cpu")
    assert "no --method given: using c3gan (typical image 300 px" in result.stderr
    assert yaml.safe_load(result.stdout)["method"] == "c3gan"
    result = run("train", big, "--clusters", 2, "--image-size", 64, "--out", tmp_path / "b", "--dry-run",
                 "--device", "cpu")
    assert "using c3gan-64-cpu (3 files, --image-size 64, on a CPU)" in result.stderr


def test_preset_pick_by_device():
    """The GPU presets on a GPU; on a CPU the -cpu variant where one exists, else the GPU preset, said so."""
    assert pick_preset("c3gan", None, 28, "cuda") == ("c3gan-32", "typical image 28 px")
    assert pick_preset("slcgan", None, 28, "cpu") == ("slcgan-32-cpu", "typical image 28 px, on a CPU")
    assert pick_preset("c3gan", 32, 500, "cpu")[0] == "c3gan-32-cpu"
    name, why = pick_preset("c3gan", None, 200, "cpu")
    assert name == "c3gan-128" and "a GPU preset" in why
    assert pick_preset("c3gan", None, None, "cuda") == ("c3gan-32", "no readable image to size it by")


def test_method_pick_by_image_side():
    """Without --method: slcGAN for small images (up to 40 px), C3-GAN for larger ones or when none is readable."""
    assert pick_method(28)[0] == "slcgan" and pick_method(40)[0] == "slcgan"
    assert pick_method(41)[0] == "c3gan" and pick_method(500)[0] == "c3gan"
    assert pick_method(None) == ("c3gan", "no readable image to size the folder by")


def test_without_method_a_run_of_either_method_in_the_default_place_resumes(mnist_200, tmp_path, monkeypatch):
    """A C3-GAN run in runs/<folder>-c3gan-k3 (made before the method was picked from the folder) resumes
    when `train` is run again without --method, although the folder's pick is now slcGAN."""
    monkeypatch.chdir(tmp_path)
    assert run("train", mnist_200, "--clusters", 3, "--preset", "cpu-tiny", "--steps", 2, "--quiet").exit_code == 0
    earlier = Path("runs") / f"{mnist_200.name}-c3gan-k3"
    assert (earlier / "checkpoint").is_dir()
    result = run("train", mnist_200, "--clusters", 3, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert f"run directory {earlier} (resume)" in result.stderr and "no --method given" not in result.stderr
    assert yaml.safe_load(result.stdout)["method"] == "c3gan"
    result = run("train", mnist_200, "--clusters", 3, "--dry-run", "--restart")       # a new run: picked again
    assert "no --method given: using slcgan" in result.stderr and "slcgan-k3 (new run)" in result.stderr


@pytest.mark.parametrize("command, shown", [
    ("train", "[default: runs/DATA-METHOD-kK]"),
    ("assign", "[default: the training folder]"),
    ("assign", "[default: the run's]"),
    ("demo", "[default: the demo preset's]"),
])
def test_help_shows_defaults_written_in_brackets(command, shown):
    # The help is rendered with rich markup, which drops an unescaped "[default: ...]" as a tag.
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    words = " ".join(result.stdout.replace("│", " ").split())           # undo the panel's wrapping
    assert shown in words


def test_unknown_method_is_a_usage_error(mnist_200, tmp_path):
    for flags in (["--method", "kmeans"], ["--set", "method=kmeans"]):
        result = run("train", mnist_200, "--clusters", 5, *flags, "--out", tmp_path / "r", "--dry-run")
        assert result.exit_code == 2
        assert "unknown method 'kmeans'; known: c3gan, slcgan" in result.stderr and "preset" not in result.stderr


def test_dry_run_prints_config_and_trains_nothing(mnist_200, tmp_path):
    result = run("train", mnist_200, "--clusters", 7, "--preset", "cpu-tiny", "--out", tmp_path / "r", "--dry-run",
                 "--set", "c3gan.ngf=8")
    assert result.exit_code == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["clusters"] == 7 and cfg["c3gan"]["ngf"] == 8 and cfg["image_size"] == 16
    assert "200 files" in result.stderr
    assert not (tmp_path / "r").exists()


def test_dry_run_under_torchrun_prints_on_rank_0_only(mnist_200, tmp_path, monkeypatch):
    """torchrun sets RANK and WORLD_SIZE: rank 1 prints neither the config nor the preset it picked."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = run("train", mnist_200, "--clusters", 3, "--out", tmp_path / "r", "--dry-run", "--device", "cpu")
    assert result.exit_code == 0 and result.stdout == "" and "preset" not in result.stderr
    monkeypatch.setenv("RANK", "0")
    result = run("train", mnist_200, "--clusters", 3, "--out", tmp_path / "r", "--dry-run", "--device", "cpu")
    assert yaml.safe_load(result.stdout)["clusters"] == 3 and "using slcgan-32-cpu" in result.stderr


@pytest.mark.parametrize("has_bf16, flags, hinted", [
    (True, [], True),
    (True, ["--precision", "fp32"], False),
    (True, ["--quiet"], False),
    (False, [], False),
])
def test_cpu_with_bf16_units_gets_a_precision_hint(has_bf16, flags, hinted, mnist_200, tmp_path, monkeypatch):
    """`auto` stays fp32 on a CPU; where the CPU has bf16 units, train says --precision bf16 is faster."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    result = run("train", mnist_200, "--clusters", 3, "--preset", "cpu-tiny", "--out", tmp_path / "r", "--dry-run",
                 "--device", "cpu", *flags)
    assert result.exit_code == 0, result.stderr
    assert ("--precision bf16 trains 1.5-2x faster" in result.stderr) == hinted
    assert yaml.safe_load(result.stdout)["precision"] == ("fp32" if flags[:1] == ["--precision"] else "auto")


@pytest.mark.parametrize("args, code, words", [
    (["train", "{missing}", "--clusters", "3"], 2, "no such folder"),
    (["train", "{data}", "--clusters", "3", "--preset", "nope"], 2, "unknown preset"),
    (["train", "{data}", "--clusters", "3", "--method", "c3gan", "--set", "c3gan.ngff=3"], 2, "c3gan.ngff"),
    (["train", "{data}", "--clusters", "3", "--set", "c3gan.ngf=32"], 2, "--set c3gan.ngf: a c3gan setting, but this run uses slcgan"),
    (["train", "{data}", "--clusters", "3", "--set", "steps=many"], 2, "steps"),
    (["train", "{data}", "--clusters", "3", "--image-size", "48"], 2, "image_size"),
    (["train", "{data}"], 2, "--clusters"),
    (["train", "{data}", "--clusters", "3", "--device", "cuda"], 2, "CUDA"),
    (["train", "{empty}", "--clusters", "3"], 3, "no usable images"),
    (["train", "{data}", "--clusters", "500", "--preset", "cpu-tiny"], 3, "fewer than the 500 clusters"),
])
def test_bad_usage_gives_one_line_and_exit_code(args, code, words, mnist_200, tmp_path):
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "data": mnist_200, "empty": tmp_path / "empty"}
    result = run(*[a.format(**paths) for a in args], "--out", tmp_path / "run")
    assert result.exit_code == code, result.stderr
    assert words in result.stderr
    assert result.stderr.count("error:") == 1


def test_generate_cluster_out_of_range(trained):
    result = run("generate", trained, "--cluster", 10)
    assert result.exit_code == 2 and "out of range" in result.stderr


def test_preset_from_yaml_file(mnist_200, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("image_size: 32\nc3gan:\n  ngf: 8\n")
    result = run("train", mnist_200, "--clusters", 4, "--preset", preset, "--dry-run")
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["c3gan"]["ngf"] == 8
    preset.write_text("image_size: [32\n")
    result = run("train", mnist_200, "--clusters", 4, "--preset", preset, "--dry-run")
    assert result.exit_code == 2 and "malformed YAML" in result.stderr


def test_ctrl_c_saves_a_checkpoint_and_exits_130(mnist_200, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "imgcluster", "train", str(mnist_200), "--clusters", "10", "--preset", "cpu-tiny",
           "--steps", "100000", "--out", str(out), "--set", "checkpoint_every=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint" / "state.safetensors"), "pt") as f:
        assert int(f.metadata()["step"]) >= 5
