"""Benchmarks of the light runtime (numbers go into docs/benchmarks.md; not a timed test).

Usage::

    python tools/benchmark.py                 # import, construction, latency, plumbing, cold CLI
    python tools/benchmark.py --light-venv    # also build a fresh light-runtime venv and measure it
    python tools/benchmark.py --only-latency --stages --runs 30   # latency, plumbing, per-stage time

Prints medians (and p95 where it matters) of repeated runs on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def bench_import(n: int) -> dict[str, float]:
    times = []
    for _ in range(n):
        out = subprocess.run(
            [sys.executable, "-c", "import time; t=time.perf_counter(); import echo_agent; print(time.perf_counter()-t)"],
            capture_output=True, text=True, check=True,
        )
        times.append(float(out.stdout.strip()))
    return {"import_echo_agent_s_median": statistics.median(times)}


def bench_cold_cli(n: int, image: Path) -> dict[str, float]:
    exe = Path(sys.executable).parent / "echo-agent"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "echo_agent.cli"]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([*cmd, "run", str(image), "--quiet"], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return {"cold_cli_run_s_median": statistics.median(times), "cold_cli_run_s_max": max(times)}


def bench_agent(n: int, image: Path, *, prefetch_context: bool = True) -> dict[str, float]:
    from echo_agent import EchoAgent
    from echo_agent.tools import Toolkit

    t = time.perf_counter()
    agent = EchoAgent(toolkit=Toolkit(prefetch_context=prefetch_context))
    construct = time.perf_counter() - t
    t = time.perf_counter()
    agent.run(image)  # first run loads the detector, captioner, retriever
    first = time.perf_counter() - t
    lat, cpu = [], []
    for _ in range(n):
        # Every timed run is a first look at the image: the detector's output cache and the
        # toolkit's preprocessing cache would otherwise answer the repeated image for free.
        clear = getattr(agent.toolkit, "clear_caches", None)  # absent before these caches existed
        if clear is not None:
            clear()
        t, c = time.perf_counter(), time.process_time()
        agent.run(image)
        lat.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return {
        "construct_s": construct,
        "first_run_s": first,
        "run_ms_p50": statistics.median(lat),
        "run_ms_p95": _pct(lat, 0.95),
        # CPU time of the run (all threads): moves far less than wall time with other jobs' load
        "run_cpu_ms_p50": statistics.median(cpu),
    }


def bench_plumbing(n: int) -> dict[str, float]:
    """Graph + tool plumbing cost: the same 3-tool run with instant fake backends."""
    sys.path.insert(0, str(REPO / "tests"))
    from _fakes import fake_toolkit, speckle_image

    from echo_agent import EchoAgent

    agent = EchoAgent(organ="breast", toolkit=fake_toolkit(render_overlays=False), router=None)
    img = speckle_image(400, 500)
    agent.run(img)
    lat, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        agent.run(img)
        lat.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return {"plumbing_ms_p50": statistics.median(lat), "plumbing_ms_p95": _pct(lat, 0.95),
            "plumbing_cpu_ms_p50": statistics.median(cpu)}


def bench_graph_floor(n: int) -> dict[str, float]:
    """LangGraph's own cost for the agent's graph shape: the same state schema, nodes and edges as
    ``build_graph`` (with its inline single-call ToolNode), nodes that do nothing but write the
    messages of a 3-tool-call run. What ``plumbing`` measures above this is echo-agent's own code."""
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, StateGraph

    from echo_agent.graph.state import EchoInput, EchoOutput, EchoState
    from echo_agent.tools._upstream import InlineToolNode as _ToolNode

    @tool
    def noop(x: int = 0) -> str:
        """Does nothing."""
        return "{}"

    def perceive(state):  # noqa: ANN001 - LangGraph reads the hints: none here (local names)
        return {"messages": [HumanMessage("look")], "tool_calls_used": 0}

    def reasoner(state):  # noqa: ANN001
        used = state.get("tool_calls_used", 0)
        if used < 3:
            call = {"name": "noop", "args": {}, "id": f"c{used}", "type": "tool_call"}
            return {"messages": [AIMessage("", tool_calls=[call])], "tool_calls_used": used + 1}
        return {"messages": [AIMessage("done")]}

    def route(state):  # noqa: ANN001
        return "tools" if state["messages"][-1].tool_calls else "reason"

    def reason(state):  # noqa: ANN001
        return {"diagnosis": {"label": "normal"}, "messages": [AIMessage("diagnosis")]}

    g = StateGraph(EchoState, input_schema=EchoInput, output_schema=EchoOutput)
    for name, fn in (("perceive", perceive), ("reasoner", reasoner), ("tools", _ToolNode([noop])), ("reason", reason)):
        g.add_node(name, fn)
    g.add_edge(START, "perceive")
    g.add_edge("perceive", "reasoner")
    g.add_conditional_edges("reasoner", route, ["tools", "reason"])
    g.add_edge("tools", "reasoner")
    g.add_edge("reason", END)
    graph = g.compile()
    inp = {"image": {"id": "x", "width": 1, "height": 1}, "organ": "breast"}
    for _ in range(20):
        graph.invoke(inp)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        graph.invoke(inp)
        lat.append((time.perf_counter() - t) * 1000)
    return {"graph_floor_ms_p50": statistics.median(lat)}


def bench_stages(n: int, image: Path | str) -> dict[str, float]:
    """Where a run's wall time goes: mean ms per run spent in each stage (wrapped with timers).

    Stages may nest (``detector: forward`` is inside ``detector: detect``); ``plumbing + rest`` is
    the run minus the top-level stages (graph, tool wrappers, messages, JSON). Patches the library
    in this process, so it runs last.
    """
    import collections
    import importlib

    from echo_agent import EchoAgent

    acc: dict[str, float] = collections.defaultdict(float)

    def timed(owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[label] += time.perf_counter() - t

        setattr(owner, attr, wrapper)

    mod = importlib.import_module
    from echo_agent.detectors.base import LetterboxYoloDetector
    from echo_agent.evidence.captioner import PixelCaptioner

    top = {  # top-level stages (they do not nest in one another)
        "load + hash image": (mod("echo_agent.imaging"), "load_image"),
        "organ routing": (mod("echo_agent.organs.routing"), "default_router"),
        "detector: FOV crop + annotation removal": (mod("echo_agent.imaging.preprocess"), "prepare_for_detection"),
        "detector: detect (letterbox, forward, decode, TTA merge)": (LetterboxYoloDetector, "detect_batch"),
        "captioner: describe": (PixelCaptioner, "describe"),
        "second look: classify (crops + forward)": (mod("echo_agent.detectors.region_classifier").OnnxRegionClassifier, "classify"),
        "overlay rendering": (mod("echo_agent.imaging.overlay"), "render_overlay"),
    }
    inner = {
        "  detector: network forward passes": (mod("echo_agent.detectors.onnx").OnnxDetector, "_forward"),
        # runs in the captioner's background thread while the detector works (Toolkit.prefetch_context)
        "  captioner: whole-image analysis (background)": (mod("echo_agent.evidence._descriptors"), "analyse_image"),
        "  captioner: regions": (mod("echo_agent.evidence._descriptors"), "analyse_region"),
    }
    for label, (owner, attr) in {**top, **inner}.items():
        timed(owner, attr, label)
    # the router and the captioner's helpers are looked up through their modules at call time
    agent = EchoAgent()
    retriever = agent.toolkit.get_retriever()
    timed(type(retriever), "retrieve", "retriever")
    fusion_mod = mod("echo_agent.fusion.learned")
    timed(fusion_mod.LearnedFusion, "fuse", "reason: fusion")
    agent.run(image)
    acc.clear()
    t_all = 0.0
    for _ in range(n):
        clear = getattr(agent.toolkit, "clear_caches", None)
        if clear is not None:
            clear()
        t = time.perf_counter()
        agent.run(image)
        t_all += time.perf_counter() - t
    out = {f"stage_ms {k}": v * 1000 / n for k, v in acc.items()}
    tops = sum(v for k, v in acc.items() if k in top or k in ("retriever", "reason: fusion"))
    out["stage_ms plumbing + rest"] = (t_all - tops) * 1000 / n
    out["stage_ms run (mean)"] = t_all * 1000 / n
    return out


def bench_classifier(n: int, image: Path | str, weights: Path | None = None) -> dict[str, float]:
    """The breast second-look classifier alone (ONNX Runtime, one thread, as in the agent): p50 ms
    for 1 crop (the whole image) and for 3 crops (two candidates and the whole image, the embedded
    policy's call), on the example image after the detector's preprocessing. ``weights``: another
    classifier file (a candidate) instead of the packaged one."""
    from echo_agent.detectors import get_region_classifier, load_region_classifier
    from echo_agent.imaging import load_image
    from echo_agent.imaging.preprocess import prepare_for_detection
    from echo_agent.schemas import Box

    clf = load_region_classifier(weights) if weights else get_region_classifier("breast")
    view = prepare_for_detection(load_image(image).array).array
    h, w = view.shape[:2]
    boxes = [Box(x1=w * 0.3, y1=h * 0.3, x2=w * 0.6, y2=h * 0.7), Box(x1=w * 0.1, y1=h * 0.1, x2=w * 0.3, y2=h * 0.3), None]
    clf.classify(view, boxes)  # load the session
    out = {}
    for k in (1, 3):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            clf.classify(view, boxes[-k:])
            ts.append(time.perf_counter() - t)
        out[f"classifier_{k}_crop_ms_p50"] = _pct(ts, 0.5) * 1000
    out["classifier_ms_per_crop_p50"] = out["classifier_3_crop_ms_p50"] / 3
    return out


def bench_candidate_classifiers(n: int, image: Path | str, files: list[Path]) -> dict[str, float]:
    """Per-crop p50 (3-crop calls) and file size of the packaged breast second look and of each
    candidate file, timed in 3 interleaved rounds so that the machine's load moves them alike; the
    result per file is the median of its rounds. Keys name the file as given ("packaged" for the
    packaged one)."""
    from echo_agent.organs import get_organ

    paths: dict[str, Path | None] = {"packaged": None, **{str(f): f for f in files}}
    rounds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(3):
        for name, f in paths.items():
            rounds[name].append(bench_classifier(n, image, f)["classifier_ms_per_crop_p50"])
    out: dict[str, float] = {}
    for name, f in paths.items():
        out[f"{name}: ms per crop (3 crops), p50 of rounds"] = _pct(rounds[name], 0.5)
        out[f"{name}: MB"] = Path(f or get_organ("breast").resolve_classifier_weights()).stat().st_size / 2**20
    return out


def bench_light_venv() -> dict[str, float]:
    d = Path(tempfile.mkdtemp(prefix="echo-light-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(d)], check=True)
        t = time.perf_counter()
        lock = REPO / "requirements" / "constraints.txt"  # as the README's run command installs it
        subprocess.run([str(d / "bin" / "pip"), "install", "-q", "-c", str(lock), str(REPO)], check=True)
        install_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
        has_torch = subprocess.run([str(d / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode == 0
        return {"light_venv_mb": size / 2**20, "light_install_s": install_s, "light_venv_has_torch": float(has_torch)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50, help="repetitions for latency medians")
    ap.add_argument("--image", type=Path, default=None, help="image to time (default: bundled example)")
    ap.add_argument("--light-venv", action="store_true", help="measure a fresh light-runtime venv")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    ap.add_argument("--stages", action="store_true", help="also break a run's wall time down by stage")
    ap.add_argument("--no-prefetch-context", action="store_true",
                    help="time run with the captioner's whole-image analysis inline (Toolkit(prefetch_context=False))")
    ap.add_argument("--only-latency", action="store_true",
                    help="skip the import and cold-CLI measurements (latency and plumbing only)")
    ap.add_argument("--only-classifier", type=Path, nargs="*", default=None, metavar="ONNX",
                    help="time only second-look classifiers: the packaged breast one and each file given, interleaved")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from echo_agent.imaging import example_image

    image = args.image or example_image("breast_malignant")
    res: dict[str, float | str] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.only_classifier is not None:
        res.update(bench_candidate_classifiers(args.runs, image, args.only_classifier))
    else:
        if not args.only_latency:
            res.update(bench_import(7))
            res.update(bench_cold_cli(5, image))
        res.update(bench_agent(args.runs, image, prefetch_context=not args.no_prefetch_context))
        res.update(bench_classifier(args.runs, image))
        res.update(bench_plumbing(args.runs))
        res.update(bench_graph_floor(max(args.runs, 100)))
        if args.light_venv:
            res.update(bench_light_venv())
        if args.stages:
            res.update(bench_stages(args.runs, image))
    for k, v in res.items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
