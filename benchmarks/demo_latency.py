#!/usr/bin/env python
"""Latency of the web demo per query, against calling the `retrieve` signature directly, in one run.

    python benchmarks/demo_latency.py                  # 60 queries, k = 10, CSS small test gallery
    python benchmarks/demo_latency.py --quick          # 12 queries
    python benchmarks/demo_latency.py --run runs/css_smoke --screenshot docs/demo.png

The export: a smoke-preset model (`configs/presets/smoke.yaml` architecture; random weights
unless --run gives a trained run: the latency does not depend on them) exported with the test
images of the built-in CSS `small` benchmark as its gallery (3,201 images; generated into
data/cache on first use). The demo server runs as tools/demo.py in a child process on
127.0.0.1 (keras unimportable there, as in the tests). For each of N known test queries (a
gallery image and its modification text, k = 10), interleaved query by query so that load from
other processes hits every variant alike:

    direct      the retrieve signature called in this process (tf.saved_model.load), with the
                k + 1 the page asks for (the reference image is left out of the results)
    page_api    POST /api/search from Python: what the page's request costs (HTTP + JSON +
                reading the gallery file + retrieve)
    rest        POST /v1/models/<name>:predict with the retrieve signature (image sent as b64)
    page        the page in headless Chromium: the page's own measurement from the click's
                request to the results grid in the DOM (the figure it shows as "ms per query");
                thumbnails are cached by then. Skipped, saying why, without Chromium/Playwright.

Reported: median and 90th percentile per variant, and each median as a ratio to `direct` (a
ratio is steadier than a time on a shared machine); the load average before and after.
Writes docs/demo_latency.md.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _common as C  # noqa: E402

NAME = "demo_latency"


def uptime() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"
    except OSError:
        return "n/a"


def make_export(tmp: Path, run=None):
    """(export version folder, CSS root, gallery folder): a smoke-preset model exported over the
    CSS small test images."""
    from keras_irtf import api
    from keras_irtf.config import load_config, repo_configs_dir
    from keras_irtf.data.css_generator import ensure_generated

    root = ensure_generated(REPO / "data" / "cache", "small", 0, verbose=False)
    gallery = tmp / "css_small_test"
    gallery.mkdir()
    for p in sorted((root / "images").glob("css_test_*.png")):
        # copies: the exporter and the demo refuse a gallery file that links out of its folder
        shutil.copyfile(p, gallery / p.name)
    if run is None:
        configs = repo_configs_dir()
        cfg = load_config([configs / "css.yaml", configs / "presets" / "smoke.yaml"],
                          [f"data.root={root}", "data.dataset.size=small"])
        bench = api.load_benchmark(cfg)
        model = api.create_model(cfg, bench, compile=False)
        run = api.save_run(model, cfg, bench, tmp / "css_smoke_demo")
    export = api.export_run(run, out_root=tmp / "exported", gallery=gallery, verbose=False)
    return export, root, gallery


def known_queries(root, gallery_paths, n):
    """n known test queries (gallery id of the reference, text), spread over the test split."""
    from keras_irtf.data.css import read_css_npy

    index = {p: i for i, p in enumerate(gallery_paths)}
    mods = read_css_npy(root)["test"]["mods"]
    step = max(1, len(mods) // n)
    out = []
    for mod in mods[::step]:
        ref = index.get(f"css_test_{int(mod['from'][0]):06d}.png")
        if ref is not None:
            out.append((ref, mod["to_str"]))
    return out[:n]


def stats(ms):
    ms = sorted(ms)
    return {"median": statistics.median(ms), "p90": ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))],
            "n": len(ms)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=60)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--run", help="a trained run folder (default: the smoke-preset architecture, random weights)")
    p.add_argument("--quick", action="store_true", help="12 queries (a smoke test)")
    p.add_argument("--screenshot", help="also save a PNG of the page showing results (e.g. docs/demo.png)")
    p.add_argument("--out", default=str(C.DOCS / f"{NAME}.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.warmup = min(args.queries, 12), min(args.warmup, 2)

    load_before = uptime()
    tmp = Path(tempfile.mkdtemp(prefix="demo_latency_"))
    try:
        return measure(args, tmp, load_before)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # owned: made by mkdtemp above


def measure(args, tmp: Path, load_before: str) -> int:
    import base64
    import json

    import tensorflow as tf

    from keras_irtf.demo.process import DemoProcess, chromium_page, find_chromium

    t0 = time.perf_counter()
    export, root, gallery = make_export(tmp, args.run)
    print(f"export {export} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    gallery_paths = (export / "assets.extra" / "gallery.txt").read_text().split("\n")[:-1]
    queries = known_queries(root, gallery_paths, args.queries + args.warmup)
    retrieve = tf.saved_model.load(str(export)).signatures["retrieve"]
    name = export.parent.name

    page_skip = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        page_skip = "playwright is not installed (pip install -e '.[test]')"
    if page_skip is None and find_chromium() is None:
        page_skip = "no Chromium installed (apt-get install -y chromium)"

    times = {"direct": [], "page_api": [], "rest": [], "page": []}
    browser = None
    with DemoProcess(export, "--queries", root) as demo:
        import contextlib

        page_ctx = chromium_page() if page_skip is None else contextlib.nullcontext()
        with page_ctx as page:
            if page is not None:
                from importlib import metadata

                browser = (f"Chromium {page.context.browser.version} ({find_chromium()}), "
                           f"Playwright {metadata.version('playwright')}")
                page.goto(demo.url)
                page.wait_for_selector("#gallery-grid .thumb")
                page.fill("#k", str(args.k))

            def run_direct(ref, text):
                data = (gallery / gallery_paths[ref]).read_bytes()
                start = time.perf_counter()
                out = retrieve(image_bytes=tf.constant([data]), text=tf.constant([text]),
                               k=tf.constant([args.k + 1], tf.int32))
                out["ids"].numpy()
                return (time.perf_counter() - start) * 1000

            def run_page_api(ref, text):
                start = time.perf_counter()
                status, body = demo.request("POST", "/api/search", {"image_id": ref, "text": text, "k": args.k})
                ms = (time.perf_counter() - start) * 1000
                assert status == 200 and len(body["results"]) == args.k, body
                return ms

            def run_rest(ref, text):
                data = (gallery / gallery_paths[ref]).read_bytes()
                start = time.perf_counter()
                status, body = demo.request("POST", f"/v1/models/{name}:predict", {
                    "signature_name": "retrieve",
                    "instances": [{"image_bytes": {"b64": base64.b64encode(data).decode()}, "text": text,
                                   "k": args.k + 1}]})
                ms = (time.perf_counter() - start) * 1000
                assert status == 200, body
                return ms

            def run_page(ref, text):
                page.fill("#gallery-search", gallery_paths[ref])
                page.wait_for_function(f"document.querySelectorAll('#gallery-grid .thumb').length === 1 && "
                                       f"document.querySelector('#gallery-grid .thumb').dataset.id === '{ref}'")
                page.click(f"#gallery-grid .thumb[data-id='{ref}']")
                page.fill("#text", text)
                page.evaluate("delete document.getElementById('latency').dataset.ms")
                page.click("#search")
                page.wait_for_function("document.getElementById('latency').dataset.ms !== undefined")
                assert len(page.query_selector_all("#results .result")) == args.k
                return float(page.get_attribute("#latency", "data-ms"))

            variants = {"direct": run_direct, "page_api": run_page_api, "rest": run_rest}
            if page is not None:
                variants["page"] = run_page
            order = list(variants)
            for i, (ref, text) in enumerate(queries):
                rotated = order[i % len(order):] + order[: i % len(order)]
                for v in rotated:
                    ms = variants[v](ref, text)
                    if i >= args.warmup:
                        times[v].append(ms)
            if page is not None and args.screenshot:
                for ref, text in queries:  # a query whose target is among the results, if any is
                    run_page(ref, text)
                    if page.query_selector_all("#results .result.target"):
                        break
                page.wait_for_function("[...document.querySelectorAll('#results .result img')]"
                                       ".every(i => i.complete && i.naturalWidth > 0)")
                page.screenshot(path=args.screenshot, full_page=True)
                print(f"screenshot: {args.screenshot}", flush=True)
    load_after = uptime()

    results = {v: stats(ms) for v, ms in times.items() if ms}
    base = results["direct"]["median"]
    labels = {"direct": "retrieve signature, in process (k + 1)",
              "page_api": "POST /api/search (the page's request, from Python)",
              "rest": "POST /v1/models/NAME:predict (retrieve, b64 image)",
              "page": "the page in headless Chromium (its own ms per query)"}
    rows = ["| variant | what | median ms | p90 ms | x direct |", "|---|---|---|---|---|"]
    for v, r in results.items():
        rows.append(f"| {v} | {labels[v]} | {r['median']:.1f} | {r['p90']:.1f} | {r['median'] / base:.2f} |")
    info = C.machine_info()
    body = "\n".join([
        "# Web demo latency per query",
        "",
        f"Command: `{C.command_line()}`. Gallery: the {len(gallery_paths):,} test images of the built-in CSS "
        f"`small` benchmark; model: {'the run ' + args.run if args.run else 'smoke-preset architecture, random weights'}; "
        f"k = {args.k}; {results['direct']['n']} timed queries (known CSS test queries, a gallery image as the "
        f"reference, {args.warmup} warm-up queries not counted), variants interleaved query by query.",
        "",
        *rows,
        "",
        (f"The page measurement was skipped: {page_skip}." if page_skip else
         "`page` is what the page shows as \"ms per query\": from sending the request to the results grid "
         f"in the DOM (thumbnails come from the browser's cache or load afterwards); {browser}, headless."),
        "",
        f"Load average (1, 5, 15 min) before: {load_before}; after: {load_after} "
        f"({info.get('logical_cpus')} logical CPUs: a load well above that number means other work shared them).",
        "",
        "## Machine",
        "",
        C.machine_markdown(info),
    ])
    C.write_doc(NAME, body, args.out)
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(
        {"results": results, "k": args.k, "gallery": len(gallery_paths), "load_before": load_before,
         "load_after": load_after, "page_skipped": page_skip}, indent=2) + "\n")
    summary = [f"CSS small test gallery ({len(gallery_paths):,} images), k = {args.k}, "
               f"{results['direct']['n']} queries; load {load_before} -> {load_after}"]
    for v, r in results.items():
        summary.append(f"{v}: median {r['median']:.1f} ms (p90 {r['p90']:.1f}), {r['median'] / base:.2f}x direct")
    if page_skip:
        summary.append(f"page: skipped ({page_skip})")
    C.print_summary(NAME, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
