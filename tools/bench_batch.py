"""Images per second of a batch run: the local engine vs the process-pool and Ray engines, on this machine.

Every engine runs the same images into its own fresh journal. Reported per engine:

* ``end_to_end_img_s``: images / (start .. last journal line), i.e. including model loading and, for
  the process pool and Ray, starting the workers (the Ray instance itself is started before the
  clock runs);
* ``first_result_s``: start .. first journal line;
* ``second_half_img_s``: the rate over the second half of the journal lines (steady state);
* ``cpu_ms_per_image``: CPU time of the driver process per image (the local engine's whole cost).

Examples::

    # the packaged agent on 48 BrEaST-Lesions_USG images, local vs Ray with 2 workers
    python tools/bench_batch.py --limit 48 --workers 2
    # the packaged agent on all 256 BrEaST-Lesions_USG images, in this process vs 2 worker processes
    python tools/bench_batch.py --limit 256 --engines local,processes
    # without detector weights: the fake tool backends of tests/_fakes.py (graph + fusion cost only)
    python tools/bench_batch.py --limit 48 --fake-tools
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def fake_tools_agent(organ: str) -> Any:
    """An agent on the fake tool backends (tests/_fakes.py); importable by Ray workers by reference."""
    sys.path.insert(0, str(REPO / "tests"))
    from _fakes import fake_toolkit

    from echo_agent import EchoAgent

    return EchoAgent(toolkit=fake_toolkit(), organ=organ, router=None)


def packaged_agent(organ: str, prefetch_context: bool = True) -> Any:
    """The default agent (packaged detectors, captioner, retriever, embedded policy)."""
    from echo_agent import EchoAgent
    from echo_agent.tools import Toolkit

    return EchoAgent(organ=organ, toolkit=Toolkit(prefetch_context=prefetch_context))


def _timed(run: Any) -> dict[str, Any]:
    stamps: list[float] = []
    t0 = time.perf_counter()
    c0 = time.process_time()
    summary = run(lambda it, rec: stamps.append(time.perf_counter()))
    cpu = time.process_time() - c0
    n = summary.processed
    res: dict[str, Any] = {"images": n, "ok": summary.ok, "errors": summary.errors, "labels": summary.labels}
    if n:
        half = n // 2
        res.update(
            # CPU time of this process (all its threads) per image: on a shared machine it moves
            # far less with the other jobs' load than the wall-clock rates (Ray workers not included).
            cpu_ms_per_image=round(cpu * 1000 / n, 2),
            seconds=round(stamps[-1] - t0, 3),
            first_result_s=round(stamps[0] - t0, 3),
            end_to_end_img_s=round(n / (stamps[-1] - t0), 3),
            # Results of a Ray run arrive in bursts after the actors start: the rate over the second
            # half of the results is the steady rate, free of start-up cost.
            second_half_img_s=round((n - half) / (stamps[-1] - stamps[half - 1]), 3) if half >= 1 and stamps[-1] > stamps[half - 1] else None,
        )
    return res


def main(argv: list[str] | None = None) -> int:
    from echo_agent.eval.manifest import default_data_root

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=None,
                    help="folder, glob or manifest (default: BrEaST-Lesions_USG case images under $ECHO_AGENT_DATA)")
    ap.add_argument("--organ", default="breast")
    ap.add_argument("--limit", type=int, default=48, help="first N images of the source")
    ap.add_argument("--engines", default="local,ray", help="comma list of local, processes, ray")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (processes, ray)")
    ap.add_argument("--chunk-size", type=int, default=16,
                    help="images per agent.batch call (one batched detector pass each)")
    ap.add_argument("--fake-tools", action="store_true", help="use the fake tool backends of tests/_fakes.py")
    ap.add_argument("--no-prefetch-context", action="store_true",
                    help="packaged agent with the captioner's whole-image analysis inline (Toolkit(prefetch_context=False))")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from echo_agent.batch import collect_inputs, run_batch

    source = args.source or str(default_data_root() / "BrEaST-Lesions_USG" / "images_and_masks" / "case[0-9][0-9][0-9].png")
    items = collect_inputs(source, organ=args.organ)[: args.limit]
    factory = (functools.partial(fake_tools_agent, args.organ) if args.fake_tools
               else functools.partial(packaged_agent, args.organ, not args.no_prefetch_context))
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python tools/bench_batch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "source": source, "images": len(items),
        "agent": "fake tool backends (tests/_fakes.py)" if args.fake_tools else "packaged default agent",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "engines": {},
    }
    try:
        for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
            out = work / f"{engine}.jsonl"
            if engine == "local":
                agent = factory()
                results["engines"]["local"] = _timed(lambda cb, agent=agent, out=out: run_batch(
                    items, out, agent=agent, chunk_size=args.chunk_size, on_item=cb, progress=False))
            elif engine == "processes":
                from echo_agent.scale.process_engine import run_batch_processes

                results["engines"][f"processes-{args.workers}w"] = _timed(lambda cb, out=out: run_batch_processes(
                    items, out, workers=args.workers, chunk_size=args.chunk_size, agent_factory=factory,
                    on_item=cb, progress=False))
            elif engine == "ray":
                import ray

                from echo_agent.scale.ray_engine import run_batch_ray

                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO / "tools"), str(REPO)])}})
                try:
                    res = _timed(lambda cb, out=out: run_batch_ray(
                        items, out, workers=args.workers, chunk_size=args.chunk_size, agent_factory=factory,
                        on_item=cb, progress=False))
                finally:
                    ray.shutdown()
                results["engines"][f"ray-{args.workers}w"] = res
            else:
                ap.error(f"unknown engine {engine!r}; use local or ray")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
