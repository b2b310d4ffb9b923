"""The documentation is tested like the code: every shell and Python block of README.md and
docs/**/*.md runs, in order, one working folder per page (tests/docs_runner.py), and the output a
page shows is compared with what its command printed.

What differs from a reader's run is stated here, in one place:

- THE BUDGET RULE (`with_small_budget`): a training command (tools/train.py, tools/ablate.py,
  examples/train_with_callbacks.py) that does not already use the smoke preset gets
  `--set train.steps=4 --set data.dataset.css.size=smoke` appended: 4 steps, and the `smoke` CSS
  set when the dataset is the built-in CSS (other datasets ignore that key).
- `pip install` lines are not executed: the test environment was installed that way. Each extra
  they name must be declared in setup.cfg.
- A page runs on small fixtures placed where it says its data is (`PAGE_SETUP`): datasets in the
  published layouts and tiny random CLIP and BERT models. Pages that continue another page start
  from a copy of that page's folder, as a reader who followed it would.
- The blocks that are shown but not run carry `<!-- not run: REASON -->`; `NOT_RUN` lists them all.

The working folder holds links to the checkout's tools/, configs/, examples/ and benchmarks/, and
data/cache/ is shared by all pages, so the CSS smoke set is generated once and frozen CLIP features
are computed once.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docs_runner import RUN_LANGUAGES, SHOWN_LANGUAGES, PageRun, logical_lines, parse_blocks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs" / "_ext"))


def documentation_pages() -> list:
    pages = [ROOT / "README.md"]
    pages += sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.relative_to(ROOT / "docs").parts)
    return [str(p.relative_to(ROOT)) for p in pages]


PAGES = documentation_pages()

# Every block that is shown but not run, page by page, with its reason (the marker's text).
NOT_RUN = {
    "README.md": ["runs the whole test suite, of which this check is a part"],
    "docs/architecture.md": ["the pages run in a folder without the checkout's sources; tests/test_architecture.py "
                             "runs the same check"],
    "docs/demo.md": ["starts a server that runs until it is stopped (tests/test_demo.py drives the demo)"],
    "docs/distributed-and-resuming.md": ["needs two GPUs"],
    "docs/export-and-serve.md": ["trains the default model (under 20 minutes on two cores)",
                                 "needs Docker and the TF Serving image"],
    "docs/gradient-augmentation.md": ["trains the whole study, 105 runs (about 12 hours of training on two cores)"],
    "docs/large-galleries.md": ["needs a Google Cloud project, Dataflow and the network",
                                "needs a Flink cluster, Java and the network",
                                "needs a Spark cluster, Java and the network"],
    "docs/models.md": ["downloads pretrained weights from the network"],
    "docs/train-your-data.md": ["needs the real MIT-States and Fashion200k folders and a ResNet-18 preset "
                                "(tens of GB, hours of training)"],
    "docs/results/README.md": ["reproduces the measurement, 90 training runs (about 45 minutes on two cores)",
                               "reproduces the measurement, 20 training runs (about two and a half hours on two cores)",
                               "reproduces H1 of the study, 20 training runs with APGD (about two and a half hours on "
                               "two cores)",
                               "reproduces H3 of the study, 30 training runs with APGD (about three hours on two cores)",
                               "reproduces H2 of the study, 45 training runs with APGD (about three and a half hours "
                               "on two cores)",
                               "reproduces H4 of the study, 30 training runs with APGD (about five hours on two cores)"],
    "docs/results/superseded_2026-12-01/README.md": ["the record of a superseded measurement (110 training runs, "
                                                     "about four hours on two cores)"],
    "docs/results/superseded_2026-11-23/README.md": ["the record of a superseded measurement (its sampler and training "
                                              "recall are no longer the defaults)"],
}

# ---- the budget rule ------------------------------------------------------------------------------
TRAINING_COMMAND = re.compile(r"\bpython (?:tools/train\.py|tools/ablate\.py|examples/train_with_callbacks\.py)\b")
SMALL_BUDGET = "--set train.steps=4 --set data.dataset.css.size=smoke"
COMMAND_END = re.compile(r"\s(?:&&|\|\||\||;|&|2?>|#)(?=\s|$)")


def with_small_budget(line: str) -> str:
    """A documented training run, made small: SMALL_BUDGET after its arguments."""
    match = TRAINING_COMMAND.search(line)
    if not match or "--preset smoke" in line:
        return line
    end = COMMAND_END.search(line, match.end())
    cut = end.start() if end else len(line.rstrip())
    return f"{line[:cut]} {SMALL_BUDGET}{line[cut:]}"


INSTALL = re.compile(r"^(?:python3? -m )?pip install (?:-e )?'?\.(?:\[(?P<extras>[\w,]+)\])?'?\s*$")


def declared_extras() -> set:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return set(parser["options.extras_require"])


def rewrite(line: str):
    """What runs for one logical shell line of a page: None for an install line (checked instead)."""
    install = INSTALL.match(line.strip())
    if install:
        extras = set(filter(None, (install.group("extras") or "").split(",")))
        unknown = extras - declared_extras()
        assert not unknown, f"{line!r} names extras setup.cfg does not declare: {sorted(unknown)}"
        return None
    if line.strip().startswith(("pip install", "python -m pip install")):
        raise AssertionError(f"an install line of another form than the test knows: {line!r}")
    return with_small_budget(line)


# ---- fixtures placed in a page's folder -----------------------------------------------------------
def _fixture_texts():
    from keras_irtf.testing import cir_fixtures as F

    return list(F._EDITS) + list(F._TEST1_EDITS) + list(F._COLOURS) + list(F._DETAILS)


def make_fixture(name: str, folder: Path) -> dict:
    """{path in the page folder: source path} of one fixture, made in `folder` (once a session)."""
    from keras_irtf.testing import cir_fixtures as F

    if name == "clip":
        from keras_irtf.testing.tiny_clip import make_tiny_clip_preset

        make_tiny_clip_preset(folder / "clip", texts=_fixture_texts())
        return {"models/clip_vit_base_patch16": folder / "clip"}
    if name == "bert":
        from keras_irtf.testing.tiny_bert import make_tiny_hub_bert

        texts = ["add large red circle to top-left", "remove middle-center object", "make bottom-right object blue"]
        preprocess, encoder = make_tiny_hub_bert(folder / "bert", texts, hidden_size=768)  # BERT-Base's width
        return {"models/bert_en_uncased_preprocess": Path(preprocess),
                "models/bert_en_uncased_L-12_H-768_A-12": Path(encoder)}
    if name == "fashioniq":
        F.write_fashioniq(folder / "fashioniq")
        return {"datasets/fashioniq": folder / "fashioniq"}
    if name == "cirr":
        F.write_cirr(folder / "cirr")
        return {"datasets/cirr": folder / "cirr"}
    if name == "triplets":
        F.write_triplets(folder / "triplets")
        return {"my_triplets": folder / "triplets"}
    raise KeyError(name)


# What a page needs besides the checkout: fixtures, the folder of the page it continues, files of
# the checkout copied in (the site build writes into docs/_build).
PAGE_SETUP = {
    "README.md": {"copies": ["docs", "README.md", "CHANGELOG.md"]},
    "docs/results/README.md": {"copies": ["docs/results"]},
    "docs/train-your-data.md": {"fixtures": ["triplets", "fashioniq", "cirr", "clip"]},
    "docs/vision-language.md": {"fixtures": ["fashioniq", "clip"]},
    "docs/models.md": {"fixtures": ["bert"]},
    "docs/evaluation.md": {"starts_from": "docs/get-started.md"},
    "docs/export-and-serve.md": {"starts_from": "docs/get-started.md"},
    "docs/reliability-and-security.md": {"starts_from": "docs/get-started.md"},
    "docs/large-galleries.md": {"starts_from": "docs/get-started.md"},
}
LINKED = ("tools", "configs", "examples", "benchmarks")


class DocsSession:
    """Runs pages on demand, once each; keeps each page's folder for the pages that continue it."""

    def __init__(self, base: Path):
        self.base = base
        self.cache = base / "cache"  # data/cache of every page
        self.cache.mkdir()
        self.fixtures = {}
        self.folders = {}
        self.failed = {}
        self.seconds = {}
        self.blocks = {}

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "KERAS_IRTF_CACHE"}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        env.update(TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="100", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        return env

    def fixture(self, name: str) -> dict:
        if name not in self.fixtures:
            folder = self.base / "fixtures" / name
            folder.mkdir(parents=True)
            self.fixtures[name] = make_fixture(name, folder)
        return self.fixtures[name]

    def prepare(self, page: str) -> Path:
        setup = PAGE_SETUP.get(page, {})
        folder = self.base / "pages" / page.replace("/", "__")
        if "starts_from" in setup:
            shutil.copytree(self.run(setup["starts_from"]), folder, symlinks=True)
        else:
            folder.mkdir(parents=True)
            for name in LINKED:
                (folder / name).symlink_to(ROOT / name)
            (folder / "data").mkdir()
            (folder / "data" / "cache").symlink_to(self.cache)
        for name in setup.get("copies", []):
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("_build", "__pycache__"))
            else:
                shutil.copy2(source, folder / name)
        for name in setup.get("fixtures", []):
            for target, source in self.fixture(name).items():
                shutil.copytree(source, folder / target)  # copy2 keeps the times the feature cache keys on
        return folder

    def run(self, page: str) -> Path:
        if page in self.failed:
            raise AssertionError(f"{page} failed earlier: {self.failed[page]}")
        if page not in self.folders:
            started = time.monotonic()
            folder = self.prepare(page)
            runner = PageRun(folder, self.env(), rewrite)
            try:
                runner.run(parse_blocks(ROOT / page, page))
            except BaseException as e:
                self.failed[page] = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise
            finally:
                self.seconds[page] = time.monotonic() - started
                self.blocks[page] = [(r.block.line, r.seconds) for r in runner.results]
            self.folders[page] = folder
        return self.folders[page]


@pytest.fixture(scope="session")
def docs_session(tmp_path_factory):
    session = DocsSession(tmp_path_factory.mktemp("docs"))
    yield session
    if session.seconds:
        total = sum(session.seconds.values())
        print("\ndocs pages:", ", ".join(f"{p} {s:.0f} s" for p, s in session.seconds.items()), f"(total {total:.0f} s)")
        for page, blocks in session.blocks.items():
            print(f"  {page}: " + ", ".join(f"line {line} {s:.1f} s" for line, s in blocks))


def _all_blocks():
    return [b for page in PAGES for b in parse_blocks(ROOT / page, page)]


# Pages measured slower than the rest (each about half a minute or more on 2 cores).
SLOW_PAGES = {"README.md", "docs/train-your-data.md", "docs/python-api.md", "docs/export-and-serve.md",
              "docs/distributed-and-resuming.md", "docs/gradient-augmentation.md", "docs/large-galleries.md"}
RUNNABLE = [p for p in PAGES if any(b.language in RUN_LANGUAGES and b.not_run is None
                                    for b in parse_blocks(ROOT / p, p))]


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p
                                  for p in RUNNABLE])
def test_every_block_of_the_page_runs(page, docs_session):
    if page == "README.md":
        pytest.importorskip("sphinx", reason="README builds the site: pip install -e '.[docs]'")
        pytest.importorskip("myst_parser", reason="README builds the site: pip install -e '.[docs]'")
    folder = docs_session.run(page)
    if page == "README.md":
        check_site_is_offline(folder / "docs" / "_build" / "html")


def check_site_is_offline(html: Path):
    """The built site loads nothing from another host: no script, style sheet, font or image."""
    pages = list(html.rglob("*.html"))
    assert len(pages) > 20, f"the site was not built into {html}"
    remote = re.compile(r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)
    found = [f"{p.relative_to(html)}: {m.group(0)}" for p in pages for m in remote.finditer(p.read_text())]
    assert not found, "the built site fetches from other hosts:\n" + "\n".join(found[:10])
    css = [f for f in html.rglob("*.css") if re.search(r"@import\s+url\(\s*['\"]?https?:|url\(\s*['\"]?https?://",
                                                       f.read_text(errors="replace"))]
    assert not css, f"style sheets that load from other hosts: {css}"


def test_pages_use_known_block_languages():
    unknown = [f"{b.where()}: ```{b.language}" for b in _all_blocks()
               if b.language not in RUN_LANGUAGES + SHOWN_LANGUAGES]
    assert not unknown, "blocks the docs test neither runs nor knows to be display-only: " + ", ".join(unknown)


def test_the_blocks_not_run_are_the_listed_ones():
    found = {}
    for b in _all_blocks():
        if b.not_run is not None:
            assert b.not_run.strip(), f"{b.where()}: a not-run marker needs its reason"
            found.setdefault(b.page, []).append(b.not_run)
    assert found == NOT_RUN


def test_the_budget_rule():
    assert with_small_budget("python tools/train.py --dataset css") == f"python tools/train.py --dataset css {SMALL_BUDGET}"
    assert with_small_budget("python tools/train.py --dataset css --preset smoke") == \
        "python tools/train.py --dataset css --preset smoke"
    assert with_small_budget('X=1 python tools/train.py --out runs/mw &') == f"X=1 python tools/train.py --out runs/mw {SMALL_BUDGET} &"
    assert with_small_budget("python tools/evaluate.py --run r") == "python tools/evaluate.py --run r"
    assert rewrite("python -m pip install -e '.[test]'") is None
    with pytest.raises(AssertionError, match="does not declare"):
        rewrite("python -m pip install -e '.[nonexistent]'")


def test_blocks_are_counted():
    blocks = _all_blocks()
    runnable = [b for b in blocks if b.language in RUN_LANGUAGES and b.not_run is None and not b.save_as]
    lines = sum(len(logical_lines(b.code)) for b in runnable if b.language == "bash")
    print(f"\n{len(runnable)} blocks run ({lines} shell lines), {sum(1 for b in blocks if b.save_as)} saved as "
          f"files, {sum(1 for b in blocks if b.expected_output)} outputs compared, "
          f"{sum(1 for b in blocks if b.not_run is not None)} not run")
    assert len(runnable) > 30


# ---- what the documentation may not say ----------------------------------------------------------
HISTORY = re.compile(r"issue #?[0-9]+|\(#[0-9]+\)|\bused to\b", re.I)
COMMIT_WORD = re.compile(r"\bcommit\s+[0-9a-f]{7,40}\b", re.I)
HEX = re.compile(r"\b[0-9a-f]{7,40}\b")
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".html", ".js", ".css", ".txt", ".json", ".cfg"}


def _current_text_files() -> list:
    files = [ROOT / "README.md"]
    for top in ("docs", "configs", "keras_irtf"):
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if not path.is_file() or path.suffix not in TEXT_SUFFIXES or "__pycache__" in rel.parts:
                continue
            if rel.parts[:2] == ("docs", "_build"):
                continue
            files.append(path)
    return files


def _commit_ids(tokens: set) -> set:
    """The tokens that name a commit of this repository (none when git or its history is missing)."""
    if not tokens or not (ROOT / ".git").exists() or shutil.which("git") is None:
        return set()
    proc = subprocess.run(["git", "cat-file", "--batch-check"], cwd=ROOT, input="\n".join(sorted(tokens)) + "\n",
                          capture_output=True, text=True)
    return {line.split()[0] for line in proc.stdout.splitlines() if " commit " in line} if proc.returncode == 0 else set()


def test_history_lives_in_the_changelog():
    hits, hex_tokens = [], {}
    for path in _current_text_files():
        rel = path.relative_to(ROOT)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pattern in (HISTORY, COMMIT_WORD):
                hits += [f"{rel}:{number}: {m.group(0)!r}" for m in pattern.finditer(line)]
            for token in HEX.findall(line):
                if re.search(r"[0-9]", token) and re.search(r"[a-f]", token):
                    hex_tokens.setdefault(token, f"{rel}:{number}")
    hits += [f"{hex_tokens[t]}: commit id {t!r}" for t in sorted(_commit_ids(set(hex_tokens)))]
    assert not hits, ("history belongs in CHANGELOG.md, not in the current documentation, configs or messages:\n"
                      + "\n".join(hits))


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual is docs/"
    for page in ("get-started", "configuration", "tools", "api"):
        assert f"docs/{page}.md" in "\n".join(lines)


def test_ci_installs_what_the_readme_tells_a_user_to_install():
    """The README's test command and CI install the same extras: a user who follows the README
    runs the tests CI runs (a missing extra would turn tests into skips)."""
    def installs(path):
        found = re.findall(r"pip install (?:--quiet )?-e '\.\[([a-z,]+)\]'", path.read_text())
        return [set(extras.split(",")) for extras in found]

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = set(cfg["options.extras_require"])
    ci = installs(ROOT / ".ci" / "run")
    assert ci == [declared], f"CI installs {ci}; setup.cfg declares {sorted(declared)}"
    assert declared in installs(ROOT / "README.md"), "the README's test command installs other extras than CI"


def test_every_configuration_key_has_a_meaning():
    import irtf_reference

    assert irtf_reference.undescribed_keys() == []
    sections = irtf_reference.config_reference()
    for section in sections:
        names = [k.name for k in section.keys]
        assert len(names) == len(set(names)), section.title
    keys = {k.name for s in sections for k in s.keys}
    assert {"train.steps", "ga.adversarial.eps", "model.composer.dropout", "data.dataset.size"} <= keys


def test_the_tool_reference_covers_every_tool():
    import irtf_reference

    assert set(irtf_reference.TOOLS) == {p.stem for p in (ROOT / "tools").glob("*.py")}


def test_the_generated_references_say_how_to_see_them():
    """docs/tools.md and docs/api.md are filled in by the site build only: read as Markdown (on
    GitHub) they would look empty, so each says so above its directive, with the build command,
    and README says it where it lists them."""
    build = "sphinx-build -W -b html docs docs/_build/html"
    for page, directive in (("docs/tools.md", "```{tool-reference}"), ("docs/api.md", "```{public-api}")):
        text = (ROOT / page).read_text()
        intro = text.split(directive)[0]
        assert directive in text and build in intro and "GitHub" in intro, page
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Documentation")[1]
    assert "`docs/tools.md` and `docs/api.md`" in section and build in section


def test_no_docstring_joins_its_lines_with_a_lone_backslash():
    """A shell command wrapped with `\\` inside a (non-raw) docstring is joined into one line by
    Python, so --help and the generated tool reference would show it run together."""
    import ast

    found = []
    for top in ("tools", "benchmarks", "keras_irtf"):
        for path in sorted((ROOT / top).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            lines = source.splitlines()
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    continue
                doc = node.body[0] if node.body else None
                if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                        and isinstance(doc.value.value, str)):
                    continue
                if lines[doc.lineno - 1].lstrip().lower().startswith(("r\"", "r'")):
                    continue  # a raw string keeps its backslashes
                for k in range(doc.lineno - 1, doc.end_lineno - 1):
                    text = lines[k]
                    if text.endswith("\\") and not text.endswith("\\\\"):
                        found.append(f"{path.relative_to(ROOT)}:{k + 1}")
    assert not found, f"write the continuation as \\\\ (or make the docstring raw): {found}"
