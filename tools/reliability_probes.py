#!/usr/bin/env python
"""Run every bad-input and fault probe and write the table to docs/reliability.md.

    python tools/reliability_probes.py                 # all probes (a few minutes on 2 cores)
    python tools/reliability_probes.py --skip-slow     # without the probes that train
    python tools/reliability_probes.py --out -         # print the table instead of writing it
    python tools/reliability_probes.py --only SIGTERM  # the probes whose name contains SIGTERM (printed)

Each probe builds its small input in a temporary folder (the CSS smoke set, a tiny Fashion200k,
an untrained smoke model exported once), provokes one fault, and compares what happens with what
should happen. Library-level probes run in this process; the command-line ones (tools/*.py) run
in a subprocess as a user would run them. Nothing is downloaded.
"""

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PROBES = []


def probe(name, expected, slow=False):
    def wrap(fn):
        PROBES.append((name, expected, slow, fn))
        return fn

    return wrap


def cli(tool, *args, timeout=300, env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="-1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def raises(fn, *exceptions):
    try:
        fn()
    except exceptions as e:
        return f"{type(e).__name__}: {e}"
    return None


class Ctx:
    """Shared, lazily built inputs."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self._css = self._export = None

    @property
    def css(self):
        if self._css is None:
            from keras_irtf.data.css_generator import generate

            self._css = generate(self.tmp / "css_smoke", size="smoke", seed=0, verbose=False)
        return self._css

    def cfg(self, *overrides):
        from keras_irtf.config import load_config, repo_configs_dir

        c = repo_configs_dir()
        return load_config([c / "css.yaml", c / "presets" / "smoke.yaml"], [f"data.root={self.css}", *overrides])

    @property
    def export(self):
        if self._export is None:
            from keras_irtf import api
            from keras_irtf.data.text import TextVectorizer
            from keras_irtf.serving.export import export_model

            cfg = self.cfg("data.image_size=32")
            work = self.tmp / "export_run"
            work.mkdir()
            vectorizer = TextVectorizer.from_texts(["add a red cube", "make it blue"], cfg.model.max_text_length)
            vectorizer.save(work / "vocab.txt")
            gallery = self.tmp / "gallery"
            gallery.mkdir()
            for i in range(3):
                shutil.copy(self.css / "images" / f"css_test_{i:06d}.png", gallery / f"g{i}.png")
            model = api.create_model(cfg, vectorizer, compile=False)
            path = export_model(model, cfg, self.tmp / "exported", run_dir=work, gallery=gallery, verbose=False)
            self._export = (path, gallery)
        return self._export


# ---- configuration ------------------------------------------------------------------------------
@probe("unknown config key (`--set train.stepz=5`)", "error listing the valid keys")
def _(ctx):
    from keras_irtf.config import ConfigError

    msg = raises(lambda: ctx.cfg("train.stepz=5"), ConfigError)
    return msg, bool(msg and "valid keys" in msg)


@probe("config file that is not valid YAML", "error naming the file")
def _(ctx):
    from keras_irtf.config import ConfigError, load_config

    bad = ctx.tmp / "bad.yaml"
    bad.write_text("train: [steps: 1\n")
    msg = raises(lambda: load_config([bad]), ConfigError)
    return msg, bool(msg and str(bad) in msg and "not valid YAML" in msg)


@probe("learning rate NaN / 0, `data.image_size=0`, negative `ga.isotropic.gamma`", "refused at config time, naming key and domain")
def _(ctx):
    from keras_irtf.config import ConfigError

    msgs = [raises(lambda o=o: ctx.cfg(o), ConfigError) for o in
            ("optim.learning_rate=.nan", "optim.learning_rate=0", "data.image_size=0", "ga.isotropic.gamma=-1")]
    return " / ".join(m or "accepted" for m in msgs), all(m and "expected" in m or m and "below" in m for m in msgs)


@probe("`--set train.steps=true`, `steps: yes` in a YAML file, `--set model.image_encoder.stem_stride=true`",
       "refused naming key, value and expected type (a boolean is not 1); `train.jit_compile=1` still means true")
def _(ctx):
    from keras_irtf.config import ConfigError, load_config

    bad = ctx.tmp / "bool_steps.yaml"
    bad.write_text("train:\n  steps: yes\n")
    msgs = [raises(lambda o=o: ctx.cfg(o), ConfigError) for o in
            ("train.steps=true", "model.image_encoder.stem_stride=true", "data.dataset.seed=true")]
    msgs.append(raises(lambda: load_config([bad]), ConfigError))
    jit = ctx.cfg("train.jit_compile=1").train.jit_compile
    r = cli("train", "--preset", "smoke", "--data-root", ctx.css, "--out", ctx.tmp / "bool_steps_run",
            "--set", "train.steps=true", "--quiet")
    ok = all(m and "is a boolean; expected" in m for m in msgs) and str(bad) in msgs[-1] and jit is True
    ok = ok and r.returncode == 2 and "train.steps=True is a boolean; expected an int" in r.stderr
    return (" / ".join(m or "accepted" for m in msgs[1:]) + f" / jit_compile=1 -> {jit} / "
            f"tools/train.py exit {r.returncode}: {last_line(r.stderr)[:160]}"), ok


@probe("config file whose top level is a list or a number; a section that is not a mapping (`train: 5`)",
       "error naming the file (and the section), no traceback")
def _(ctx):
    from keras_irtf.config import ConfigError, load_config

    out, ok = [], True
    for name, text, want in (("top_list.yaml", "- train\n- model\n", "expected a mapping of sections"),
                             ("top_int.yaml", "5\n", "expected a mapping of sections"),
                             ("section_int.yaml", "train: 5\n", "section 'train' must be a mapping of keys")):
        path = ctx.tmp / name
        path.write_text(text)
        msg = raises(lambda: load_config([path]), ConfigError)
        out.append(msg or "accepted")
        ok = ok and bool(msg and str(path) in msg and want in msg)
    return " / ".join(out), ok


@probe("`--set data.image_size=100000` (numpy would ask for 1.75 TiB), `model.embed_dim=1000000`, "
       "`train.batch_size=4096` with `data.image_size=4096`",
       "refused at config time, naming the key, the limit and why")
def _(ctx):
    from keras_irtf.config import ConfigError

    msgs = [raises(lambda o=o: ctx.cfg(*o), ConfigError) for o in
            (("data.image_size=100000",), ("model.embed_dim=1000000",), ("train.batch_size=4096", "data.image_size=4096"))]
    ok = bool(msgs[0] and "data.image_size=100000" in msgs[0] and "<= 4096 (" in msgs[0])
    ok = ok and bool(msgs[1] and "model.embed_dim=1000000" in msgs[1] and "<= 16384 (" in msgs[1])
    ok = ok and bool(msgs[2] and "train.batch_size=4096" in msgs[2] and "GiB" in msgs[2])
    return " / ".join(m or "accepted" for m in msgs), ok


@probe("`--import ./json.py` / `--import ./yaml.py` (a plug-in named like a standard-library or installed module)",
       "refused before any of it runs, saying to rename the file; exit 2")
def _(ctx):
    folder = ctx.tmp / "shadowing_plugins"
    folder.mkdir(exist_ok=True)
    marker = folder / "plugin_ran"
    out, ok = [], True
    for name in ("json", "yaml"):
        plugin = folder / f"{name}.py"
        plugin.write_text(f"open({str(marker)!r}, 'w').close()\n")
        # the unknown key stops a run that got past --import before it does any work
        r = cli("train", "--import", plugin, "--dataset", "css", "--set", "train.stepz=1", "--quiet")
        out.append(f"exit {r.returncode}: {last_line(r.stderr)[:200]}")
        ok = ok and r.returncode == 2 and "rename the file" in r.stderr and "Traceback" not in r.stderr
    ok = ok and not marker.exists()
    return " / ".join(out) + f" / plug-in ran: {marker.exists()}", ok


@probe("config file that is a folder / not UTF-8 / `base: 5` / a key written twice; `--set train.steps.x=5`",
       "one-line error naming the file or the key")
def _(ctx):
    from keras_irtf.config import ConfigError, load_config

    folder = ctx.tmp / "folder.yaml"
    folder.mkdir(exist_ok=True)
    latin = ctx.tmp / "latin1.yaml"
    latin.write_bytes("data:\n  root: /donn\xe9es\n".encode("latin-1"))
    base = ctx.tmp / "base5.yaml"
    base.write_text("base: 5\n")
    twice = ctx.tmp / "twice.yaml"
    twice.write_text("train:\n  steps: 5000\n  steps: 100\n")
    cases = [(lambda: load_config([folder]), str(folder)), (lambda: load_config([latin]), str(latin)),
             (lambda: load_config([base]), str(base)), (lambda: load_config([twice]), str(twice)),
             (lambda: ctx.cfg("train.steps.x=5"), "train.steps is a single value")]
    msgs = [raises(fn, ConfigError) for fn, _ in cases]
    ok = all(m and want in m and "\n" not in m for m, (_, want) in zip(msgs, cases))
    return " / ".join(m or "accepted" for m in msgs), ok


# ---- data ---------------------------------------------------------------------------------------
@probe("missing dataset folder (`--dataset fashion200k --data-root /nonexistent`)", "error with the expected layout")
def _(ctx):
    r = cli("train", "--dataset", "fashion200k", "--data-root", ctx.tmp / "nonexistent", "--quiet")
    return f"exit {r.returncode}: {last_line(r.stderr)[:300]}", r.returncode == 2 and "layout" in r.stderr


@probe("corrupt image in a dataset", "error naming the file (or skipped and counted with on_bad_image=skip)")
def _(ctx):
    from keras_irtf.data.base import DatasetError
    from keras_irtf.data.fashion200k import Fashion200kDataset
    from keras_irtf.testing.fixtures import write_fashion200k

    root = ctx.tmp / "f200k_corrupt"
    write_fashion200k(root)
    victim = sorted(root.rglob("*.jpeg"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    msg = raises(lambda: Fashion200kDataset(root, image_size=32, verbose=False), DatasetError)
    return msg, bool(msg and victim.name in msg)


@probe("CSS `.npy` whose pickle runs code (creates a marker file)", "refused, naming the file; the marker never appears")
def _(ctx):
    import numpy as np

    from keras_irtf.data.base import DatasetError
    from keras_irtf.data.css import NPY_NAME, read_css_npy

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {ctx.tmp / 'pwned'}",))

    root = ctx.tmp / "evil_css"
    root.mkdir()
    payload = np.empty((), dtype=object)
    payload[()] = {"train": {"mods": [Exploit()]}}
    np.save(root / NPY_NAME, payload, allow_pickle=True)
    msg = raises(lambda: read_css_npy(root), DatasetError)
    return f"{msg}; marker exists: {(ctx.tmp / 'pwned').exists()}", bool(msg and "refused" in msg) and not (
        ctx.tmp / "pwned").exists()


@probe("label file listing `../outside.jpeg` or an absolute path", "refused naming file and line; `skip` drops with a warning")
def _(ctx):
    from keras_irtf.data.base import DatasetError
    from keras_irtf.data.fashion200k import Fashion200kDataset
    from keras_irtf.testing.fixtures import write_fashion200k

    out = []
    for listed in ("../outside.jpeg", "/etc/hostname"):
        root = ctx.tmp / f"f200k_escape_{len(out)}"
        write_fashion200k(root)
        label = root / "labels" / "dress_train_detect_all.txt"
        label.write_text(label.read_text() + f"{listed}\t0.9\tblue floral dress\n")
        out.append(raises(lambda: Fashion200kDataset(root, image_size=32, verbose=False), DatasetError))
    return " / ".join(m or "accepted" for m in out), all(m and "outside the dataset root" in m and "line" in m for m in out)


@probe("CSS dataset with one training PNG missing", "error naming the file (2D only with `--css-images 2d`)")
def _(ctx):
    from keras_irtf.data.base import DatasetError
    from keras_irtf.data.css import CSSDataset

    root = ctx.tmp / "css_missing"
    shutil.copytree(ctx.css, root)
    (root / "images" / "css_train_000000.png").unlink()  # owned: the probe's own generated set
    msg = raises(lambda: CSSDataset(root, verbose=False), DatasetError)
    return msg, bool(msg and "css_train_000000.png" in msg)


@probe("20000x20000 PNG (tens of KB) among dataset images", "reported as a bad image from its header, never decoded")
def _(ctx):
    from keras_irtf.data.image_files import check_image_files

    sys.path.insert(0, str(ROOT / "tests"))
    from test_serving_hardening import bomb_png

    bomb = ctx.tmp / "bomb.png"
    bomb.write_bytes(bomb_png())
    keep, bad = check_image_files([bomb], on_bad_image="skip", verbose=False)
    return f"{bad[0][1] if bad else 'accepted'}", bool(bad) and "over the limit" in bad[0][1]


# ---- run folders ----------------------------------------------------------------------------------
@probe("`tools/train.py --out DIR` where DIR holds a finished run", "exit 2, saying what is there; `--overwrite` replaces it")
def _(ctx):
    run = ctx.tmp / "finished"
    run.mkdir()
    (run / "model.keras").write_bytes(b"x")
    (run / "metrics.json").write_text("{}")
    r = cli("train", "--dataset", "css", "--preset", "smoke", "--data-root", ctx.css, "--out", run, "--quiet")
    return f"exit {r.returncode}: {last_line(r.stderr)[:200]}", r.returncode == 2 and "finished run" in r.stderr


@probe("second training into a folder another live process is training into", "stops at once naming the other process")
def _(ctx):
    import socket

    run = ctx.tmp / "locked"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        r = cli("train", "--dataset", "css", "--preset", "smoke", "--data-root", ctx.css, "--out", run, "--quiet")
    finally:
        holder.kill()
        holder.wait()
    return f"exit {r.returncode}: {last_line(r.stderr)[:200]}", r.returncode == 2 and "another training" in r.stderr


@probe("stale lock left by a killed process", "detected (pid gone) and taken over")
def _(ctx):
    import socket

    from keras_irtf.run_folder import RunLock

    run = ctx.tmp / "stale"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = RunLock(run).acquire()
    held = json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    return f"lock taken over: {held}", held


@probe("resume after a kill with another learning rate / seed / architecture", "stops listing the differing keys; `--fresh` starts over")
def _(ctx):
    from keras_irtf.run_folder import RunFolderError, run_folder_guard

    run = ctx.tmp / "mismatch"
    with run_folder_guard(run, ctx.cfg(f"train.out={run}"), verbose=False):
        pass
    for name in ("w.weights.h5", "r.rng.npz"):
        (run / "backup" / name).write_bytes(b"x")
    (run / "backup" / "state.json").write_text(json.dumps({"step": 5, "weights": "w.weights.h5", "rng": "r.rng.npz",
                                                           "train_seconds": 1}))
    changed = ctx.cfg(f"train.out={run}", "optim.learning_rate=0.5", "model.embed_dim=32")

    def enter():
        with run_folder_guard(run, changed, verbose=False):
            pass

    msg = raises(enter, RunFolderError)
    return msg[:300] if msg else "resumed", bool(msg and "optim.learning_rate" in msg and "model.embed_dim" in msg)


@probe("backup step whose state has exploded (batch-norm variance 1e23) or is NaN", "not backed up; the last good backup stays; the NaN message names its step")
def _(ctx):
    import keras
    import numpy as np

    from keras_irtf.training.backup import TrainingBackup, latest_backup

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 4)), np.ones((4, 3)), verbose=0)
    backup = TrainingBackup(ctx.tmp / "bk", every_steps=1)
    backup.set_model(model)
    model.optimizer.iterations.assign(1)
    backup.on_train_batch_end(0, {"loss": 1.0})
    model.layers[1].moving_variance.assign(np.full(3, 1e23, np.float32))
    model.optimizer.iterations.assign(2)
    backup.on_train_batch_end(0, {"loss": 1.0})
    step = latest_backup(ctx.tmp / "bk")["step"]
    return f"backup stays at step {step}; refused: {backup.refused[0][1] if backup.refused else '-'}", step == 1


@probe("truncated or empty `model.keras` (evaluate, export)", "'is damaged' naming the file, exit 2")
def _(ctx):
    from keras_irtf.config import to_yaml

    run = ctx.tmp / "damaged"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(ctx.cfg()))
    (run / "vocab.txt").write_text("a\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("config.json", "{}" * 3000)
    (run / "model.keras").write_bytes(buf.getvalue()[:500])
    r1 = cli("export", "--run", run, "--out", ctx.tmp / "exp_damaged", "--quiet")
    r2 = cli("evaluate", "--run", run, "--quiet")
    ok = all(r.returncode == 2 and "is damaged" in r.stderr for r in (r1, r2))
    return f"export exit {r1.returncode}: {last_line(r1.stderr)[:160]} | evaluate exit {r2.returncode}", ok


@probe("run-folder file modes (config.yaml, metrics.json, vocab.txt)", "the user's umask, like model.keras")
def _(ctx):
    import stat

    from keras_irtf.utils import atomic_write_text

    atomic_write_text(ctx.tmp / "modes" / "config.yaml", "x")
    mode = stat.S_IMODE((ctx.tmp / "modes" / "config.yaml").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return f"mode {oct(mode)} with umask {oct(umask)}", mode == 0o666 & ~umask


# ---- distribution ---------------------------------------------------------------------------------
@probe("`--strategy mirrored --devices /gpu:0,/gpu:1` without GPUs", "stops at once with the available devices (no hang)")
def _(ctx):
    r = cli("train", "--dataset", "css", "--preset", "smoke", "--data-root", ctx.css, "--out", ctx.tmp / "gpu",
            "--quiet", "--strategy", "mirrored", "--devices", "/gpu:0,/gpu:1", timeout=180)
    return f"exit {r.returncode}: {last_line(r.stderr)[:200]}", r.returncode == 2 and "available devices" in r.stderr


# ---- serving ----------------------------------------------------------------------------------------
@probe("serving: 20000x20000 PNG, garbage bytes, a batch of 0", "INVALID_ARGUMENT naming the limit / the formats; empty outputs")
def _(ctx):
    import tensorflow as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from test_serving_hardening import bomb_png

    path, _ = ctx.export
    served = tf.saved_model.load(str(path)).signatures
    out = []
    for data in (bomb_png(), b"not an image"):
        try:
            served["embed_image"](image_bytes=tf.constant([data]))
            out.append("accepted")
        except tf.errors.InvalidArgumentError as e:
            out.append(re.search(r"(more than \d+ pixels|could not be decoded)", e.message).group(1))
    empty = served["embed_image"](image_bytes=tf.constant([], tf.string))["embedding"].shape
    out.append(f"batch of 0 -> {tuple(empty)}")
    return " / ".join(out), out[0].startswith("more than") and out[1] == "could not be decoded" and empty[0] == 0


@probe("interrupted export (the write fails half-way)", "no version folder appears; the partial folder is removed")
def _(ctx):
    from keras_irtf.serving.export import write_atomically

    base = ctx.tmp / "atomic"

    def write(tmp):
        Path(tmp).mkdir(parents=True)
        (Path(tmp) / "saved_model.pb").write_bytes(b"half")
        raise KeyboardInterrupt

    raises(lambda: write_atomically(base, 1, write), KeyboardInterrupt)
    left = sorted(p.name for p in base.iterdir()) if base.exists() else []
    return f"left in {base.name}/: {left}", left == []


def _swapped_gallery(ctx, name):
    """A copy of the export's gallery with the pictures of g0.png and g1.png swapped: the export's
    file names, other images under two of them."""
    other = ctx.tmp / name
    shutil.copytree(ctx.export[1], other)
    a, b = (other / "g0.png").read_bytes(), (other / "g1.png").read_bytes()
    (other / "g0.png").write_bytes(b)
    (other / "g1.png").write_bytes(a)
    return other


@probe("`tools/query.py --gallery` with the export's file names but other images", "gallery embedded again (hashes differ); ranking of the new files")
def _(ctx):
    from keras_irtf.serving.query import ExportedModel, search

    path, _ = ctx.export
    other = _swapped_gallery(ctx, "gallery_swapped")
    model = ExportedModel(path)
    results = search(model, other / "g2.png", "add a red cube", other, top=2, exclude_query=False)
    emb = model.embed_images([(other / r.path.name).read_bytes() for r in results])
    q = model.embed_queries([(other / "g2.png").read_bytes()], ["add a red cube"])[0]
    ok = all(abs(r.score - float(e @ q)) < 1e-4 for r, e in zip(results, emb))
    return f"scores match the new files: {ok}", ok


@probe("`tools/query.py --image` that is a text file", "one error line, exit 2")
def _(ctx):
    path, gallery = ctx.export
    notes = ctx.tmp / "notes.png"
    notes.write_text("not an image")
    r = cli("query", "--model", path, "--image", notes, "--text", "x", "--gallery", gallery,
            "--out", ctx.tmp / "query_of_a_text_file")
    return f"exit {r.returncode}: {last_line(r.stderr)[:200]}", r.returncode == 2 and "Traceback" not in r.stderr


def _export_copy(ctx, name):
    """A copy of the shared export's version folder, to damage or rewrite."""
    copy = ctx.tmp / name / "1"
    shutil.copytree(ctx.export[0], copy)
    return copy


def _demo_client(ctx, gallery=None, export=None):
    """The demo's app as a test client: over the shared export, its gallery read from `gallery`
    (default: the export's own folder), or over `export` as it describes itself (no --gallery)."""
    from starlette.testclient import TestClient

    from keras_irtf.demo.app import create_app
    from keras_irtf.demo.served import ServedModel

    path, default = ctx.export
    served = ServedModel(export, name="m") if export else ServedModel(path, gallery_root=gallery or default, name="m")
    return TestClient(create_app(served), raise_server_exceptions=False)


@probe("demo `GET /gallery/<id>` after `ln -sf /etc/passwd gallery/g1.png` (planted while it runs)",
       "404 'outside the gallery folder'; the target is neither read nor named")
def _(ctx):
    _, gallery = ctx.export
    copy = ctx.tmp / "gallery_linked"
    shutil.copytree(gallery, copy)
    client = _demo_client(ctx, copy)
    (copy / "g1.png").unlink()  # owned: the probe's own copy of its gallery
    (copy / "g1.png").symlink_to("/etc/passwd")
    r = client.get("/gallery/1")
    error = r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else ""
    return (f"HTTP {r.status_code}: {error[:160]}",
            r.status_code == 404 and "outside the gallery folder" in error and "root:" not in r.text)


@probe("`tools/export.py --name ../../x` (and `a/b`, `/abs`)", "exit 2 'must be one plain folder name'; nothing written")
def _(ctx):
    out, results = ctx.tmp / "names" / "out", []
    for name in ("../../x", "a/b", "/abs"):
        r = cli("export", "--run", ctx.tmp / "no_run", "--out", out, "--name", name, "--quiet")
        results.append((r.returncode, last_line(r.stderr)))
    written = out.exists() or (ctx.tmp / "x").exists()
    return (f"exit {results[0][0]}: {results[0][1][:160]}; written: {written}",
            all(code == 2 and "one plain folder name" in line for code, line in results) and not written)


@probe("REST `retrieve` with `\"k\": 4294967299` (2^32 + 3), 0 or the gallery size + 1",
       "400 naming the allowed range (no wrap to 3 results)")
def _(ctx):
    import base64

    _, gallery = ctx.export
    client = _demo_client(ctx)
    image = {"b64": base64.b64encode((gallery / "g0.png").read_bytes()).decode()}
    answers = [client.post("/v1/models/m:predict", json={"signature_name": "retrieve", "instances": [
        {"image_bytes": image, "text": "x", "k": k}]}) for k in (4294967299, 0, 4)]
    first = answers[0].json().get("error", "")
    return (f"HTTP {[a.status_code for a in answers]}: {first[:160]}",
            all(a.status_code == 400 for a in answers) and "k must be >= 1 and <= 3" in first)


@probe("`tools/demo.py --gallery OTHER`: the export's file names, other pictures", "refused at start naming the file whose sha256 differs")
def _(ctx):
    from keras_irtf.demo import DemoError, build_app

    path, _ = ctx.export
    other = _swapped_gallery(ctx, "gallery_other")
    error = raises(lambda: build_app(path, gallery=other), DemoError)
    return error or "started", bool(error) and "g0.png is not the image the export embedded" in error


@probe("damaged export (truncated saved_model.pb) given to `tools/query.py` and `tools/demo.py`",
       "one line 'damaged export: <file>', exit 2")
def _(ctx):
    _, gallery = ctx.export
    copy = _export_copy(ctx, "damaged")
    data = (copy / "saved_model.pb").read_bytes()
    (copy / "saved_model.pb").write_bytes(data[:1000])
    q = cli("query", "--model", copy, "--image", gallery / "g0.png", "--text", "x", "--gallery", gallery,
            "--out", ctx.tmp / "query_of_a_damaged_export")
    d = cli("demo", "--model", copy, "--port", "0", "--log-level", "error", timeout=180)
    ok = all(r.returncode == 2 and "Traceback" not in r.stderr and last_line(r.stderr).startswith("error: damaged export")
             for r in (q, d))
    return f"query exit {q.returncode}, demo exit {d.returncode}: {last_line(q.stderr)[:160]}", ok


@probe("`tools/demo.py` where fastapi is not installed", "one line naming the package and `pip install -e '.[demo]'`, exit 2")
def _(ctx):
    path, _ = ctx.export
    shim = ctx.tmp / "no_fastapi"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['fastapi'] = None  # as if not installed\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(ROOT)]), CUDA_VISIBLE_DEVICES="-1")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--model", str(path), "--port", "0"],
                       capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)
    return (f"exit {r.returncode}: {last_line(r.stderr)[:160]}",
            r.returncode == 2 and "Traceback" not in r.stderr and "pip install -e '.[demo]'" in last_line(r.stderr))


@probe("request body `[` x 100,000 then `]` x 100,000; text `\"\\ud800\"`; `GET /gallery/<5000 digits>`",
       "400 'nests ... more than 32 levels deep'; 400 'not valid Unicode'; 404 (no 500)")
def _(ctx):
    client = _demo_client(ctx)
    deep = client.post("/api/search", content=b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"})
    text = client.post("/api/search", content=b'{"image_id": 0, "text": "\\ud800", "k": 2}',
                       headers={"Content-Type": "application/json"})
    huge = client.get("/gallery/" + "9" * 5000)
    ok = (deep.status_code == 400 and "more than 32 levels deep" in deep.json()["error"]
          and text.status_code == 400 and "not valid Unicode" in text.json()["error"] and huge.status_code == 404)
    return f"HTTP {deep.status_code} / {text.status_code} / {huge.status_code}: {deep.json().get('error', '')[:120]}", ok


@probe("export whose description names an op library `exported.evil.payload` (a module it ships) for an op TensorFlow lacks",
       "refused in one line (keras_irtf loads only the op libraries it knows); the module never runs")
def _(ctx):
    from keras_irtf.serving.op_libraries import MissingOpLibrary, register_op_libraries

    code, marker = ctx.tmp / "evil_code", ctx.tmp / "payload_ran"
    (code / "exported" / "evil").mkdir(parents=True)
    (code / "exported" / "evil" / "payload.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    sys.path.insert(0, str(code))
    try:
        info = {"op_libraries": ["exported.evil.payload"],
                "op_library_details": {"exported.evil.payload": {"ops": ["NoSuchOpXyz"], "files": ["x.so"]}}}
        error = raises(lambda: register_op_libraries(ctx.tmp / "crafted" / "1", info, {"NoSuchOpXyz"}),
                       MissingOpLibrary)
    finally:
        sys.path.remove(str(code))
    return (error or "loaded")[:200] + f"; payload ran: {marker.exists()}", bool(error) and not marker.exists()


@probe("export whose description says its gallery root is `/` and lists `etc/passwd`, with no checksums; demo `GET /gallery/0`",
       "404: without --gallery, only files whose recorded sha256 matches are served")
def _(ctx):
    crafted = _export_copy(ctx, "crafted_root")
    extra = crafted / "assets.extra"
    info = json.loads((extra / "keras_irtf_export.json").read_text())
    info["gallery"]["root"] = "/"
    (extra / "keras_irtf_export.json").write_text(json.dumps(info))
    (extra / "gallery.txt").write_text("etc/passwd\n" * 3)
    (extra / "gallery_sha256.txt").unlink()  # owned: the probe's own copy of its export
    r = _demo_client(ctx, export=crafted).get("/gallery/0")
    error = r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else r.text
    return f"HTTP {r.status_code}: {error[:160]}", r.status_code == 404 and "root:" not in r.text


# ---- faults during training (slow: real trainings) ---------------------------------------------------
def _train_args(ctx, run, steps=30):
    return ["--dataset", "css", "--preset", "smoke", "--data-root", ctx.css, "--out", run, "--steps", steps,
            "--set", "train.steps_per_epoch=12", "--set", "train.backup_every_steps=5", "--quiet"]


def _start_and_wait(ctx, run, steps, min_step):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="-1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *map(str, _train_args(ctx, run, steps))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = run / "backup" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= min_step:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    return proc


@probe("kill -9 during training, then the same command again", "resumes from the last backup and finishes", slow=True)
def _(ctx):
    run = ctx.tmp / "killed"
    proc = _start_and_wait(ctx, run, 30, 10)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = cli("train", *_train_args(ctx, run))
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    step = metrics.get("resumed_from_step")
    return f"exit {r.returncode}; resumed_from_step {step}", r.returncode == 0 and bool(step)


def _stopped_at_the_backup(err, run, how):
    """The last line names the step training stopped at, that step is the backup's, and the line
    ends with the command that resumes."""
    match = re.fullmatch(rf"{how} at step (\d+) \(backed up in {re.escape(str(run))}\); resume with `.+train\.py .+`",
                         last_line(err))
    try:
        backed_up = json.loads((run / "backup" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        backed_up = None
    return bool(match) and int(match.group(1)) == backed_up and "Traceback" not in err


@probe("Ctrl-C (SIGINT) during training",
       "stops after the step in progress: one line 'interrupted at step N (backed up in DIR); resume with `COMMAND`' "
       "where N is the backup's step, exit 130", slow=True)
def _(ctx):
    run = ctx.tmp / "sigint"
    proc = _start_and_wait(ctx, run, 400, 5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return (f"exit {proc.returncode}: {last_line(err)[:200]}",
            proc.returncode == 130 and _stopped_at_the_backup(err, run, "interrupted"))


# ---- what the project deletes, replaces and records -----------------------------------------------
@probe("CSS generator `--out DIR` where DIR holds a user's file (thesis.tex), and `--out .`",
       "exit 2 naming the folder; nothing deleted")
def _(ctx):
    d = ctx.tmp / "user_folder"
    d.mkdir()
    (d / "thesis.tex").write_text("x")
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="-1")
    gen = [sys.executable, "-m", "keras_irtf.data.css_generator", "--size", "smoke", "--no-png"]
    r1 = subprocess.run([*gen, "--out", str(d)], capture_output=True, text=True, timeout=300, env=env)
    r2 = subprocess.run([*gen, "--out", "."], cwd=d, capture_output=True, text=True, timeout=300, env=env)
    kept = (d / "thesis.tex").is_file() and sorted(p.name for p in d.iterdir()) == ["thesis.tex"]
    ok = kept and all(r.returncode == 2 and "Traceback" not in r.stderr for r in (r1, r2))
    return f"exit {r1.returncode}: {last_line(r1.stderr)[:200]} | `--out .` exit {r2.returncode}; thesis.tex kept: {kept}", ok


@probe("`tools/train.py --out u` where u/backup/ (or u/logs/) holds a user's file", "exit 2 naming the folder; the file kept")
def _(ctx):
    run = ctx.tmp / "user_backup"
    (run / "backup").mkdir(parents=True)
    (run / "backup" / "t.tex").write_text("x")
    r = cli("train", *_train_args(ctx, run, 5))
    kept = (run / "backup" / "t.tex").is_file() and len(list((run / "backup").iterdir())) == 1
    return (f"exit {r.returncode}: {last_line(r.stderr)[:200]}; t.tex kept: {kept}",
            r.returncode == 2 and kept and "did not write" in r.stderr)


@probe("finished run with an empty `backup/` folder, trained again without `--overwrite`", "refused as a finished run")
def _(ctx):
    from keras_irtf.run_folder import RunFolderError, check_not_finished, record_run_files

    run = ctx.tmp / "finished_empty_backup"
    (run / "backup").mkdir(parents=True)
    (run / "model.keras").write_bytes(b"model")
    (run / "metrics.json").write_text("{}")
    record_run_files(run, "model.keras", "metrics.json")
    msg = raises(lambda: check_not_finished(run, overwrite=False, verbose=False), RunFolderError)
    return msg[:200] if msg else "not refused", bool(msg and "finished run" in msg) and (run / "model.keras").is_file()


@probe("`--overwrite` where model.keras is not the file the run wrote (not in its manifest)", "exit 2 naming the file; nothing removed")
def _(ctx):
    from keras_irtf.safety import NotOwnedError
    from keras_irtf.run_folder import check_not_finished, record_run_files

    run = ctx.tmp / "overwrite_unproven"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    record_run_files(run, "metrics.json")
    (run / "model.keras").write_bytes(b"a model the user put here")
    msg = raises(lambda: check_not_finished(run, overwrite=True, verbose=False), NotOwnedError)
    kept = (run / "model.keras").is_file() and (run / "metrics.json").is_file()
    return f"{(msg or 'removed')[:220]}; both files kept: {kept}", bool(msg) and kept


@probe("`tools/train.py --out FILE/run` (a file in the path)", "exit 2 naming the file")
def _(ctx):
    f = ctx.tmp / "a_file"
    f.write_text("x")
    r = cli("train", *_train_args(ctx, f / "run", 5))
    return f"exit {r.returncode}: {last_line(r.stderr)[:200]}", r.returncode == 2 and "is a file" in r.stderr


@probe("run folder whose vocab.txt lost a line after training (evaluate, export)", "refused naming the file and its checksum")
def _(ctx):
    from keras_irtf import api
    from keras_irtf.data.text import TextVectorizer

    cfg = ctx.cfg("data.image_size=32")
    vectorizer = TextVectorizer.from_texts(["add a red cube", "make it blue", "remove the circle"],
                                           cfg.model.max_text_length)
    run = ctx.tmp / "vocab_edited"
    bench = api.Benchmark(cfg, verbose=False)
    bench.vectorizer = vectorizer
    api.save_run(api.create_model(cfg, vectorizer, compile=False), cfg, bench, run)
    lines = (run / "vocab.txt").read_text().splitlines(keepends=True)
    (run / "vocab.txt").write_text("".join(lines[:2] + lines[3:]))
    r1 = cli("export", "--run", run, "--out", ctx.tmp / "exp_vocab", "--quiet")
    r2 = cli("evaluate", "--run", run, "--quiet")
    ok = all(r.returncode == 2 and "vocab.txt differs" in r.stderr for r in (r1, r2))
    return f"export exit {r1.returncode}: {last_line(r1.stderr)[:200]} | evaluate exit {r2.returncode}", ok


# ---- training records what it trained (slow: real trainings) -----------------------------------------
@probe("`--steps 50` with `train.steps_per_epoch=12`", "exactly 50 steps trained and recorded (config.yaml, metrics.json, the optimizer)", slow=True)
def _(ctx):
    import yaml

    from keras_irtf.experiment import load_model

    run = ctx.tmp / "steps50"
    r = cli("train", *_train_args(ctx, run, 50))
    if r.returncode != 0:
        return f"exit {r.returncode}: {last_line(r.stderr)[:200]}", False
    recorded = (json.loads((run / "metrics.json").read_text())["steps"],
                yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"],
                int(load_model(run / "model.keras").optimizer.iterations.numpy()))
    return f"metrics.json / config.yaml / optimizer steps: {recorded}", recorded == (50, 50, 50)


@probe("backup at step N resumed with `--steps` < N; backup missing its rng.npz; truncated backup weights",
       "each stops (exit 2) naming the backup and `--fresh`; nothing recorded", slow=True)
def _(ctx):
    run = ctx.tmp / "backups"
    proc = _start_and_wait(ctx, run, 400, 20)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads((run / "backup" / "state.json").read_text())["step"]
    observed, ok = [], True
    r = cli("train", *_train_args(ctx, run, 10))
    observed.append(f"--steps 10 over step {step}: exit {r.returncode}: {last_line(r.stderr)[:160]}")
    ok &= r.returncode == 2 and "beyond train.steps=10" in r.stderr and not (run / "metrics.json").exists()
    for damage in ("truncate", "remove rng"):
        copy = ctx.tmp / f"backups_{damage.replace(' ', '_')}"
        shutil.copytree(run, copy)
        if damage == "truncate":
            w = next((copy / "backup").glob("step-*.weights.h5"))
            w.write_bytes(w.read_bytes()[:3000])
        else:
            next((copy / "backup").glob("step-*.rng.npz")).unlink()  # owned: the probe's copy of its own run
        r = cli("train", *_train_args(ctx, copy, 400))
        observed.append(f"{damage}: exit {r.returncode}: {last_line(r.stderr)[:160]}")
        ok &= r.returncode == 2 and "--fresh" in r.stderr and "Traceback" not in r.stderr
    return " | ".join(observed), ok


@probe("disk full while training (a 1 MiB tmpfs as the run folder)", "stops with one line; no partial backup file; exit 5", slow=True)
def _(ctx):
    mount = ctx.tmp / "tiny_fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        return "not run: this machine does not let the probe mount a tmpfs (tests/test_hardening_owned.py simulates ENOSPC)", False
    try:
        r = cli("train", *_train_args(ctx, mount / "run", 400))
        partial = [p.name for p in (mount / "run" / "backup").glob(".*partial*")] if (mount / "run" / "backup").is_dir() else []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    ok = r.returncode == 5 and "disk full" in r.stderr and "Traceback" not in r.stderr and not partial
    return f"exit {r.returncode}: {last_line(r.stderr)[:240]}; partial files left: {partial}", ok


@probe("SIGTERM during training",
       "as Ctrl-C: one line 'stopped by SIGTERM at step N (backed up in DIR); resume with `COMMAND`', exit 143", slow=True)
def _(ctx):
    run = ctx.tmp / "sigterm"
    proc = _start_and_wait(ctx, run, 400, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return (f"exit {proc.returncode}: {last_line(err)[:200]}",
            proc.returncode == 143 and _stopped_at_the_backup(err, run, "stopped by SIGTERM"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"), help="Markdown file ('-' = stdout)")
    p.add_argument("--skip-slow", action="store_true", help="leave out the probes that train (kill -9, Ctrl-C, SIGTERM, a full disk, step counts)")
    p.add_argument("--only", metavar="TEXT", help="run only the probes whose name contains TEXT (prints, writes nothing)")
    args = p.parse_args(argv)
    if args.only:
        args.out = "-"
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="kirtf_probes_") as tmp:
        ctx = Ctx(tmp)
        for name, expected, slow, fn in PROBES:
            if slow and args.skip_slow or args.only and args.only not in name:
                continue
            t = time.time()
            try:
                observed, ok = fn(ctx)
            except Exception as e:  # a probe that crashes is a failure, shown as such
                observed, ok = f"probe crashed: {type(e).__name__}: {e} {traceback.format_exc()[-300:]}", False
            observed = " ".join(str(observed or "").split())
            rows.append((name, expected, observed, ok))
            print(f"[{'pass' if ok else 'FAIL'}] {name} ({time.time() - t:.0f} s)", flush=True)
    passed = sum(r[3] for r in rows)

    def cell(text):
        return str(text).replace("|", "\\|").replace(tmp, "$TMP").replace(str(ROOT), "$CHECKOUT")

    lines = [
        "# Reliability: bad inputs and faults",
        "",
        "Generated by `python tools/reliability_probes.py`; re-run it to refresh this page.",
        f"{passed} of {len(rows)} probes behave as expected ({time.time() - started:.0f} s on "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}).",
        "",
        "Not probed here (two-worker runs; tests/test_distribute_failures.py): a worker whose peers",
        "never join (it gives up after train.collective_timeout_seconds), and a worker killed mid-training",
        "(its peer's next collective fails within the timeout with the resumable message, exit 4; both",
        "restarted resume from the last backup and finish). Symlinks out of the dataset root are covered",
        "by tests/test_hardening_files.py.",
        "",
        "| input or fault | expected | observed | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {cell(n)} | {cell(e)} | {cell(o[:400])} | {'pass' if ok else '**FAIL**'} |" for n, e, o, ok in rows]
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"{args.out}: {passed}/{len(rows)} pass")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
