#!/usr/bin/env python
"""Which exact retrieval backend is faster here: TensorFlow (XLA block top-k) or faiss?

    python benchmarks/retrieval_backends.py           # galleries of 3K, 10K, 30K; 5 rounds
    python benchmarks/retrieval_backends.py --quick   # smaller

For each gallery size, the same queries are ranked by `chunked_top_k(backend="tf")` and
`chunked_top_k(backend="faiss")` in ALTERNATING rounds inside one process (so that a change in
the machine's load hits both alike); the report gives the median seconds of each and their ratio,
with the load average before and after. `eval.backend=auto` chooses by what this measures
(keras_irtf.evaluation.retrieval.AUTO_FAISS_MIN_GALLERY).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

NAME = "retrieval_backends"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="3000,10000,30000", help="gallery sizes")
    p.add_argument("--queries", type=int, default=8000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="galleries of 2K and 6K, 2,000 queries, 3 rounds")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.rounds = "2000,6000", 2000, 3
    C.quiet_tensorflow()
    import numpy as np

    from keras_irtf.evaluation.retrieval import chunked_top_k, faiss_available

    if not faiss_available():
        print("faiss is not installed: pip install -e '.[faiss]'", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        gallery = rng.normal(size=(size, args.dim)).astype(np.float32)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        queries = rng.normal(size=(args.queries, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exclude = rng.integers(0, size, args.queries)
        for backend in ("tf", "faiss"):  # warm-up: tracing, XLA compilation, faiss loading
            chunked_top_k(queries[:256], gallery, args.k, exclude[:256], backend=backend)
            chunked_top_k(queries, gallery, args.k, exclude, backend=backend)
        times = {"tf": [], "faiss": []}
        same = None
        for r in range(args.rounds):
            order = ("tf", "faiss") if r % 2 == 0 else ("faiss", "tf")
            out = {}
            for backend in order:
                t = time.perf_counter()
                out[backend] = chunked_top_k(queries, gallery, args.k, exclude, backend=backend)
                times[backend].append(time.perf_counter() - t)
            same = float(np.mean(np.all(out["tf"][1] == out["faiss"][1], axis=1)))
        tf_s, faiss_s = float(np.median(times["tf"])), float(np.median(times["faiss"]))
        rows.append({"gallery": size, "queries": args.queries, "tf_s": tf_s, "faiss_s": faiss_s,
                     "tf_over_faiss": tf_s / faiss_s, "identical_rows": same,
                     "tf_all": times["tf"], "faiss_all": times["faiss"]})
        print(json.dumps(rows[-1]), flush=True)
    load_after = os.getloadavg()
    lines = [
        "# Retrieval backends: TensorFlow block top-k vs faiss (exact)",
        "",
        f"Command: `{C.command_line()}`",
        "",
        C.machine_markdown(),
        "",
        f"Load average (1, 5, 15 min) before: {load_before[0]:.2f}, {load_before[1]:.2f}, {load_before[2]:.2f}; "
        f"after: {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f}.",
        "",
        f"{args.queries:,} queries x gallery, {args.dim}-d unit vectors, k = {args.k}, each query's own source "
        f"excluded; median of {args.rounds} alternating rounds after a warm-up.",
        "",
        "| gallery | tf (s) | faiss (s) | tf / faiss | rounds tf (s) | rounds faiss (s) | identical top-k rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['gallery']:,} | {r['tf_s']:.2f} | {r['faiss_s']:.2f} | {r['tf_over_faiss']:.2f}x | "
                     f"{', '.join(f'{t:.2f}' for t in r['tf_all'])} | {', '.join(f'{t:.2f}' for t in r['faiss_all'])} | "
                     f"{100 * r['identical_rows']:.1f}% |")
    lines += ["", "A ratio above 1 means faiss was faster. Rows that are not identical differ by a swap of two "
              "items whose float32 scores tie to the last bits."]
    path = C.write_doc(NAME, "\n".join(lines) + "\n", args.out)
    C.print_summary(NAME, [f"gallery {r['gallery']:,}: tf {r['tf_s']:.2f} s, faiss {r['faiss_s']:.2f} s "
                           f"(tf / faiss {r['tf_over_faiss']:.2f}x)" for r in rows]
                    + [f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
