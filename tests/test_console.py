"""The console: standard output carries results only; notes, warnings and progress go to the
`keras_irtf` log on standard error, with no terminal control codes when it is a file or a pipe;
-q leaves warnings and errors only."""

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ESC = "\x1b"


def _tool(tool, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="-1")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it: the tool itself quiets TensorFlow
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env, stdin=subprocess.DEVNULL, cwd=cwd)


def test_train_and_evaluate_write_results_to_stdout_and_the_rest_to_stderr(css_smoke_root, tmp_path):
    run = tmp_path / "run"
    r = _tool("train", "--dataset", "css", "--preset", "smoke", "--data-root", css_smoke_root, "--out", run,
              "--steps", "4", "--set", "train.steps_per_epoch=2")
    assert r.returncode == 0, r.stderr[-3000:]
    out_lines = [line for line in r.stdout.splitlines() if line.strip()]
    # standard output: the run line and the results table, nothing else
    assert out_lines[0].startswith(f"run: {run}") and "(4 steps" in out_lines[0], r.stdout
    assert out_lines[1].startswith("| split | R@1 |") and out_lines[-1].startswith("Mt = "), r.stdout
    assert all(line.startswith(("run: ", "|", "Mt = ", "test: ")) for line in out_lines), r.stdout
    # standard error: Keras' epoch lines (one a line in a pipe), the dataset's note; no control
    # codes in either stream, and none of TensorFlow's C++ start-up lines
    assert "Epoch 1/2" in r.stderr and "Epoch 2/2" in r.stderr, r.stderr[-2000:]
    assert any(line.startswith("2/2 - ") for line in r.stderr.splitlines()), r.stderr[-2000:]
    assert ESC not in r.stdout and ESC not in r.stderr
    assert "cuda" not in r.stderr.lower() and "absl::InitializeLog" not in r.stderr

    quiet = _tool("evaluate", "--run", run, "-q")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.splitlines()[0].startswith("| split | R@1 |")
    assert quiet.stderr == ""  # no notes, no progress: only warnings and errors would be shown

    loud = _tool("evaluate", "--run", run)
    assert loud.stdout == quiet.stdout  # the same results; the progress went to standard error
    assert "embedding" in loud.stderr and "(100%)" in loud.stderr and ESC not in loud.stderr


def test_progress_in_a_log_file_is_a_line_every_tenth(caplog, monkeypatch, capsys):
    from keras_irtf.utils import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="keras_irtf")
    progress = Progress(95, "embedding test queries", unit="query")
    for _ in range(95):
        progress.update(1)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "embedding test queries"
    assert lines[1] == "embedding test queries: 10/95 queries (10%)"
    assert lines[-1] == "embedding test queries: 95/95 queries (100%)"
    assert len(lines) == 11 and not any(ESC in line for line in lines)
    assert capsys.readouterr().out == ""


def test_progress_on_a_terminal_is_one_line_redrawn_in_place(monkeypatch, capsys):
    from keras_irtf.utils import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(Progress, "REDRAW_SECONDS", 0.0)  # redraw at every update
    progress = Progress(4, unit="query")
    for _ in range(4):
        progress.update(1)
    progress.update(1)  # past the end: no second final line
    progress.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    draws = captured.err.split("\r")[1:]
    assert len(draws) == 5  # the empty bar, then one draw per update up to the total
    assert draws[0].startswith("0/4 queries [>") and draws[2].startswith("2/4 queries [===============>")
    assert "50%" in draws[2] and "s left" in draws[2]
    assert draws[-1].startswith("4/4 queries [" + "=" * Progress.WIDTH + "] 100% ") and draws[-1].endswith("\n")
    assert captured.err.count("\n") == 1 and ESC not in captured.err


def test_configure_logging_formats_warnings_and_follows_a_replaced_stderr(capsys):
    from keras_irtf.cli import configure_logging

    log = logging.getLogger("keras_irtf.data.test_console")
    handler = configure_logging(logging.INFO)
    try:
        log.info("3 images cached")
        log.warning("skipping 1 unreadable image")
        log.debug("hidden")
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == "3 images cached\nwarning: skipping 1 unreadable image\n"
        configure_logging(logging.WARNING)  # -q: replaces the handler, does not add another
        log.info("hidden")
        log.warning("shown once")
        assert capsys.readouterr().err == "warning: shown once\n"
    finally:
        logging.getLogger("keras_irtf").removeHandler(handler)
        for h in list(logging.getLogger("keras_irtf").handlers):
            if getattr(h, "_keras_irtf_console", False):
                logging.getLogger("keras_irtf").removeHandler(h)
        logging.getLogger("keras_irtf").setLevel(logging.NOTSET)


# The only print() calls of the library: command-line entry points (a function named main, or a
# module's __main__ block) write their results to standard output; everything else logs.
def test_the_library_logs_instead_of_printing():
    found = []
    for path in sorted((ROOT / "keras_irtf").rglob("*.py")):
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "main" or (
                    isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)):
                allowed |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print" \
                    and id(node) not in allowed:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_query_json_is_the_whole_of_stdout(tmp_path):
    """`tools/query.py ... --json > out.json` gives valid JSON; TensorFlow's start-up lines are in
    neither stream; the ranking is the one the plain listing prints."""
    import io
    import json

    from PIL import Image

    from conftest import export_untrained_smoke

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), (40 * i, 255 - 40 * i, 90)).save(buf, "PNG")
        return buf.getvalue()

    path, gallery, _, _ = export_untrained_smoke(tmp_path, [png(i) for i in range(5)], "exported")
    args = ["--model", path, "--image", gallery / "g0.png", "--text", "make it blue", "--gallery", gallery, "--top", "3"]
    r = _tool("query", *args, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    answer = json.loads(r.stdout)  # the whole of standard output is the JSON object
    assert [x["rank"] for x in answer["results"]] == [1, 2, 3]
    assert "g0.png" not in [Path(x["path"]).name for x in answer["results"]]  # the query is left out
    assert answer["figure"] is None and not (tmp_path / "queries").exists()  # --json alone writes nothing
    assert "cuda" not in r.stderr.lower() and "absl" not in r.stderr and ESC not in r.stderr
    listing = _tool("query", *args, "--out", tmp_path / "q")
    assert listing.returncode == 0, listing.stderr[-2000:]
    ranked = [line.split()[2] for line in listing.stdout.splitlines() if line[:3].strip().isdigit()]
    assert ranked == [x["path"] for x in answer["results"]]
    scores = [float(line.split()[1]) for line in listing.stdout.splitlines() if line[:3].strip().isdigit()]
    assert scores == [round(x["score"], 4) for x in answer["results"]]
    assert listing.stdout.splitlines()[-1] == f"wrote {tmp_path / 'q'}: grid.png, results.json"
    saved = json.loads((tmp_path / "q" / "results.json").read_text())  # what --json printed, and the figure
    assert saved == {**answer, "figure": str(tmp_path / "q" / "grid.png")}



def test_query_saves_into_a_folder_it_owns_and_replaces_nothing_else(tmp_path):
    """Without --out, tools/query.py writes grid.png and results.json into
    queries/<image name>_<text> of the working folder and says so; run again, it replaces that
    folder (its own, marked); a folder holding a user's file, a file, or the working folder itself
    given as --out is refused in one line, before anything is written, and left as it was."""
    import io
    import json

    from PIL import Image

    from conftest import export_untrained_smoke
    from keras_irtf.safety import MARKER_NAME

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), (40 * i, 255 - 40 * i, 90)).save(buf, "PNG")
        return buf.getvalue()

    path, gallery, _, _ = export_untrained_smoke(tmp_path, [png(i) for i in range(5)], "exported")
    work = tmp_path / "work"
    work.mkdir()
    args = ["--model", path, "--image", gallery / "g0.png", "--text", "Make it BLUE!", "--gallery", gallery, "--top", "3"]
    first = _tool("query", *args, cwd=work)
    assert first.returncode == 0, first.stderr[-2000:]
    folder = work / "queries" / "g0_make-it-blue"
    assert first.stdout.splitlines()[-1] == "wrote queries/g0_make-it-blue: grid.png, results.json"
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER_NAME, "grid.png", "results.json"])
    assert sorted(p.name for p in work.iterdir()) == ["queries"]  # nothing else in the working folder
    saved = json.loads((folder / "results.json").read_text())
    listed = [line.split()[2] for line in first.stdout.splitlines() if line[:3].strip().isdigit()]
    assert [r["path"] for r in saved["results"]] == listed and saved["figure"] == "queries/g0_make-it-blue/grid.png"
    assert Image.open(folder / "grid.png").size[0] > 3 * 128

    (folder / "stale.txt").write_text("from before")  # the folder is replaced as a whole
    again = _tool("query", *args, cwd=work)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (folder / "stale.txt").exists() and (folder / "grid.png").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["g0_make-it-blue"]  # no partial folder left

    mine = work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (work / "report.png").write_bytes(b"a user's figure")
    for out, what in (("mine", "a folder"), ("report.png", "a file"), (".", "a folder")):
        refused = _tool("query", *args, "--out", out, cwd=work)
        assert refused.returncode == 2 and refused.stdout == "", (out, refused.stderr[-2000:])
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {out} is {what} keras_irtf did not write"), lines
        assert lines[0].endswith("choose another --out")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert (work / "report.png").read_bytes() == b"a user's figure"


def test_a_script_starts_tensorflow_without_its_cpp_notices_as_the_python_api_page_says():
    """docs/python-api.md: `import keras` writes TensorFlow's C++ start-up notices to standard
    error even with TF_CPP_MIN_LOG_LEVEL=3 (on this project's CPU machines: CUDA's and absl's, and
    oneDNN's on the CPUs it tunes for); cli.start_tensorflow() first, as the page's script does,
    leaves standard error empty."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    plain = subprocess.run([sys.executable, "-c", "import keras"], capture_output=True, text=True, env=env,
                           timeout=300)
    notices = [line for line in plain.stderr.splitlines() if line.strip()]
    assert plain.returncode == 0 and any("cuda" in line.lower() or "absl" in line for line in notices), notices
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # as a user's shell has it
    quiet = subprocess.run([sys.executable, "-c", "from keras_irtf.cli import start_tensorflow\n"
                            "start_tensorflow()\nimport keras\nimport keras_irtf as kirtf\n"
                            "print(kirtf.load_config([]).train.steps)"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout.strip().isdigit(), quiet.stderr[-2000:]
    assert quiet.stderr == ""

def test_exit_now_flushes_the_output_and_skips_the_teardown(tmp_path):
    """cli.exit_now, which tools/train.py ends with after Ctrl-C: what was printed and logged is
    written, and Python's own teardown (freeing objects, where TensorFlow's input pipelines can
    wait for their threads) does not run: an object's finaliser and an atexit function never do."""
    marker = tmp_path / "finalised"
    code = (
        "import atexit, logging, sys\n"
        "from keras_irtf import cli\n"
        "cli.configure_logging()\n"
        "class Slow:\n"
        f"    def __del__(self): open({str(marker)!r}, 'a').write('finaliser ')\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'a').write('atexit '))\n"
        "kept = Slow()\n"
        "print('result on stdout', end='')\n"  # no newline: still in the buffer unless flushed
        "logging.getLogger('keras_irtf.x').info('a note')\n"
        "print('the one line', file=sys.stderr, end='')\n"
        "cli.exit_now(130)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stdout == "result on stdout"
    assert done.stderr == "a note\nthe one line"
    assert not marker.exists()
