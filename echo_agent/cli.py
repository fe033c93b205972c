"""The ``echo-agent`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="echo-agent",
    help="Read ultrasound images with the invoke-and-reason agent.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _parse_context(text: str | None, age: int | None, symptoms: str | None) -> dict[str, Any] | None:
    ctx: dict[str, Any] = {}
    if text:
        t = text.strip()
        if t.startswith("{"):
            try:
                ctx.update(json.loads(t))
            except json.JSONDecodeError as exc:
                raise typer.BadParameter(f"--context looks like JSON but does not parse: {exc}") from None
        else:
            ctx["notes"] = t
    if age is not None:
        ctx["age"] = age
    if symptoms:
        ctx["symptoms"] = symptoms
    return ctx or None


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise typer.BadParameter(f"{path} already exists; pass --force to overwrite it")


def _print_diagnosis(dx: Any, console: Any) -> None:
    from .rendering import summary_panel

    console.print(summary_panel(dx))


@app.command()
def run(
    image: Annotated[Path, typer.Argument(help="Image file: PNG, JPEG, TIFF, BMP or DICOM.")],
    organ: Annotated[str | None, typer.Option(help="breast | kidney | any registered organ (default: routed).")] = None,
    context: Annotated[str | None, typer.Option(help="Clinical context: free text, or a JSON object of ClinicalContext fields.")] = None,
    age: Annotated[int | None, typer.Option(help="Patient age in years.")] = None,
    symptoms: Annotated[str | None, typer.Option(help="Symptoms, e.g. 'palpable lump'.")] = None,
    frame: Annotated[int | None, typer.Option(help="Frame of a multi-frame DICOM / TIFF.")] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the Diagnosis JSON to PATH, or '-' for stdout.")] = None,
    overlay: Annotated[Path | None, typer.Option(help="Write a PNG with the reported boxes to PATH.")] = None,
    max_tool_calls: Annotated[int | None, typer.Option(help="Tool-call budget (default: the config's, 8).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite existing output files.")] = False,
    quiet: Annotated[bool, typer.Option(help="Do not print the summary.")] = False,
    steps: Annotated[bool, typer.Option(help="Print each step (tool calls, evidence) as it happens.")] = False,
    config: Annotated[Path | None, typer.Option(help="Agent config (JSON/YAML AgentConfig); --organ/--max-tool-calls apply on top.")] = None,
) -> None:
    """Diagnose one image and print a readable summary."""
    from rich.console import Console

    from .errors import EchoError

    console = Console(stderr=json_out == "-")
    json_path = Path(json_out) if json_out and json_out != "-" else None
    if json_path is not None:
        _refuse_overwrite(json_path, force)
    if overlay is not None:
        _refuse_overwrite(overlay, force)
    try:
        from .agent import EchoAgent
        from .config import AgentConfig

        ctx = _parse_context(context, age, symptoms)
        cfg = AgentConfig.load(config) if config is not None else AgentConfig()
        changes = {k: v for k, v in (("organ", organ), ("max_tool_calls", max_tool_calls)) if v is not None}
        agent = EchoAgent.from_config(cfg.replace(**changes))
        if steps:
            from .events import DiagnosisEvent

            dx = None
            for ev in agent.stream(image, context=ctx, frame=frame):
                console.print(f"[dim]{ev.step:>2}[/] [bold]{ev.type}[/] " + ev.model_dump_json(exclude={"step", "type"})[:160])
                if isinstance(ev, DiagnosisEvent):
                    dx = ev.diagnosis
            assert dx is not None
        else:
            dx = agent.run(image, context=ctx, frame=frame)
    except EchoError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from None
    if not quiet:
        _print_diagnosis(dx, console)
    payload = dx.model_dump_json(indent=2)
    if json_out == "-":
        sys.stdout.write(payload + "\n")
    elif json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(payload + "\n", encoding="utf-8")
        if not quiet:
            console.print(f"Diagnosis JSON -> {json_path}")
    if overlay is not None:
        from .rendering import diagnosis_pixels, write_overlay

        write_overlay(dx, diagnosis_pixels(dx, agent.toolkit.get_store(), image, frame=frame), overlay, overwrite=True)
        if not quiet:
            console.print(f"Overlay -> {overlay}")


@app.command("eval")
def eval_(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (see docs/data.md).")],
    out: Annotated[Path, typer.Option(help="Output folder for metrics.json, predictions.jsonl, report.md, plots.")],
    organ: Annotated[str | None, typer.Option(help="Only rows of this organ.")] = None,
    split: Annotated[str | None, typer.Option(help="Only rows of this split (train/val/test).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate a seeded random subset of N images.")] = None,
    score_threshold: Annotated[float, typer.Option(help="Detector score threshold of the detector-only baseline.")] = 0.25,
    overwrite: Annotated[bool, typer.Option(help="Allow replacing the harness's own files in a non-empty output folder.")] = False,
    fusion: Annotated[str, typer.Option(help="Reason-node fusion: 'default' (learned where parameters ship), 'heuristic', or a fusion-parameters JSON file.")] = "default",
    detector: Annotated[Path | None, typer.Option(help="Use these detector weights (.onnx/.pt) for --organ instead of the packaged ones.")] = None,
    classifier: Annotated[str | None, typer.Option(help="Second-look classifier for --organ: an .onnx file instead of the packaged one, or 'none' to run without a second look.")] = None,
    config: Annotated[Path | None, typer.Option(help="Agent config (JSON/YAML AgentConfig); --fusion/--detector/--classifier apply on top.")] = None,
    by: Annotated[str | None, typer.Option(help="Also break the metrics down by this manifest column: center, split, category ... or any other column of the CSV (a scanner, a series), the same on every row of an image; lesion_size groups by the largest reference box's share of the image.")] = None,
) -> None:
    """Evaluate detector-only vs the full agent on a manifest."""
    from .eval.harness import eval_command

    agent = None
    if fusion != "default" or detector is not None or classifier is not None or config is not None:
        from .agent import EchoAgent
        from .config import AgentConfig

        if (detector is not None or classifier is not None) and organ is None:
            raise typer.BadParameter("--detector and --classifier need --organ (the organ these weights are for)")
        base = AgentConfig.load(config) if config is not None else AgentConfig()
        changes: dict[str, Any] = {}
        if detector is not None:
            changes["detectors"] = {**base.detectors, organ: detector}
        if classifier is not None:
            changes["classifiers"] = {**base.classifiers, organ: None if classifier == "none" else Path(classifier)}
        if fusion == "heuristic":
            changes.update(fusion="heuristic", fusion_params={})
        elif fusion != "default":
            if organ is None:
                raise typer.BadParameter("--fusion PATH needs --organ")
            changes.update(fusion="learned", fusion_params={**base.fusion_params, organ: Path(fusion)})
        agent = EchoAgent.from_config(base.replace(**changes))
    from .eval.harness import _default_command

    extra = [*(["--fusion", str(fusion)] if fusion != "default" else []),
             *(["--detector", str(detector)] if detector is not None else []),
             *(["--classifier", str(classifier)] if classifier is not None else []),
             *(["--config", str(config)] if config is not None else [])]
    command = _default_command(str(manifest), out, organ, split, limit, score_threshold, extra, by=by)
    raise typer.Exit(code=eval_command(manifest, out, organ=organ, split=split, limit=limit, overwrite=overwrite,
                                       score_threshold=score_threshold, agent=agent, command=command, by=by))


@app.command()
def manifest(
    folder: Annotated[Path, typer.Argument(help="Folder of images: labels from subfolders named like the organ's labels (benign/, malignant/, normal/) unless --labels is given.")],
    organ: Annotated[str, typer.Option(help="The organ of every image (breast, kidney, or a registered plug-in's).")],
    out: Annotated[Path, typer.Option(help="The manifest CSV to write (image paths relative to its folder).")],
    labels: Annotated[Path | None, typer.Option(help="CSV with columns image,label (image: path relative to FOLDER, file name or stem); category, patient_id, group, split, age, symptoms, center are copied when present.")] = None,
    mask_pattern: Annotated[str, typer.Option(help="Mask files of an image, a glob relative to its folder with {stem} for its file name without ending; 'none' reads no masks.")] = "{stem}_mask*",
    min_area: Annotated[int, typer.Option(help="Smallest mask component, in pixels, that becomes a lesion box.")] = 50,
    center: Annotated[str | None, typer.Option(help="Name of the collection, written to the center column.")] = None,
    column: Annotated[list[str] | None, typer.Option(help="Rename a --labels column to a manifest column, FROM=TO (repeatable): ID=image, Pathology=label, tirads=category.")] = None,
    label: Annotated[str | None, typer.Option(help="Give every image this label (a folder of one class); folder names are then not read.")] = None,
    label_map: Annotated[list[str] | None, typer.Option(help="Another name of a label, FROM=TO (repeatable): abnormal=hydronephrosis; applies to folder names and --labels.")] = None,
    mask_rename: Annotated[list[str] | None, typer.Option(help="Text of an image's name that its mask's name has instead, FROM=TO (repeatable): bus_=mask_ finds mask_0001.png for bus_0001.png.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Build a manifest for `echo-agent eval` from a folder of images (labels from folders or a CSV, boxes from masks)."""
    from rich.console import Console

    from .errors import EchoError
    from .eval.from_folder import manifest_from_folder
    from .eval.manifest import write_manifest

    console = Console(soft_wrap=True)  # paths stay whole, to be copied

    def pairs(option: str, values: list[str] | None) -> dict[str, str]:
        split = [v.split("=", 1) for v in values or []]
        if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in split):
            raise typer.BadParameter(f"{option} takes FROM=TO, got {values}")
        return dict(split)  # type: ignore[arg-type]

    try:
        built = manifest_from_folder(folder, organ, labels=labels, min_area=min_area, center=center,
                                     mask_pattern=None if mask_pattern.lower() == "none" else mask_pattern,
                                     columns=pairs("--column", column), label=label,
                                     label_map=pairs("--label-map", label_map),
                                     mask_rename=pairs("--mask-rename", mask_rename))
        path = write_manifest(built.images, out, relative_to=out.resolve().parent, overwrite=overwrite)
    except FileExistsError as exc:
        console.print(f"[bold red]error:[/] {exc} (or --overwrite)")
        raise typer.Exit(code=2) from None
    except (EchoError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from None
    counts = ", ".join(f"{label} {n}" for label, n in sorted(built.counts.items()))
    console.print(f"wrote {path}: {len(built.images)} images ({counts}), {built.n_boxes} lesion boxes")
    for note in built.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"next: echo-agent eval {path} --out <results folder>")


@app.command()
def batch(
    source: Annotated[str, typer.Argument(help="A folder (recursive), a glob pattern in quotes, or a manifest CSV.")],
    out: Annotated[Path, typer.Option(help="JSONL journal of results; an existing one is resumed.")] = Path("results.jsonl"),
    organ: Annotated[str | None, typer.Option(help="Organ for every image (default: routed / from the manifest).")] = None,
    split: Annotated[str | None, typer.Option(help="Manifest only: just this split.")] = None,
    hash_ids: Annotated[bool, typer.Option(help="Item ids (journal, overlay/FHIR file names, FHIR ids) as hashes of the file names, which can carry patient names.")] = False,
    overlays: Annotated[Path | None, typer.Option(help="Folder for one overlay PNG per image.")] = None,
    fhir: Annotated[Path | None, typer.Option(help="Folder for one FHIR DiagnosticReport JSON per image.")] = None,
    engine: Annotated[str, typer.Option(
        help="local (this process) | processes (a local pool of worker processes) | ray (Ray actors)")] = "local",
    workers: Annotated[int, typer.Option(help="processes / ray: number of worker processes.")] = 2,
    chunk_size: Annotated[int, typer.Option(help="Images per agent.batch call (one batched detector pass each).")] = 16,
    config: Annotated[Path | None, typer.Option(help="Agent config (JSON/YAML AgentConfig) every worker builds its agent from.")] = None,
) -> None:
    """Diagnose many images; killed and restarted, it resumes without redoing or losing items."""
    from rich.console import Console
    from rich.table import Table

    from .batch import collect_inputs, run_batch, summarise_journal
    from .errors import EchoError

    console = Console()
    try:
        import functools

        from .agent import EchoAgent
        from .config import AgentConfig

        cfg = AgentConfig.load(config) if config is not None else AgentConfig()
        factory = functools.partial(EchoAgent.from_config, cfg)  # picklable: workers build their own
        items = collect_inputs(source, organ=organ, split=split, hash_ids=hash_ids)
        if engine == "local":
            s = run_batch(items, out, agent=factory(), overlays=overlays, fhir=fhir, chunk_size=chunk_size)
        elif engine == "processes":
            from .scale.process_engine import run_batch_processes

            s = run_batch_processes(items, out, workers=workers, overlays=overlays, fhir=fhir, chunk_size=chunk_size,
                                    agent_factory=factory)
        elif engine == "ray":
            from .scale.ray_engine import run_batch_ray

            s = run_batch_ray(items, out, workers=workers, overlays=overlays, fhir=fhir, chunk_size=chunk_size,
                              agent_factory=factory)
        else:
            raise typer.BadParameter(f"--engine must be 'local', 'processes' or 'ray', got {engine!r}")
    except EchoError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from None
    total = summarise_journal(out)
    t = Table("", "count", title=f"batch -> {out}")
    t.add_row("items", str(s.total))
    t.add_row("already done (resumed)", str(s.done_before))
    t.add_row("processed now", f"{s.processed} in {s.seconds:.1f} s ({s.images_per_second:.1f} img/s)")
    t.add_row("ok / errors (whole journal)", f"{total.ok} / {total.errors}")
    for lbl, n in sorted(total.labels.items()):
        t.add_row(f"label {lbl}", str(n))
    t.add_row("indeterminate", str(total.indeterminate))
    console.print(t)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 exposes it: needs --tokens-file, and a TLS proxy in front).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    db: Annotated[Path, typer.Option(help="SQLite file for runs and checkpoints; uploaded images go to <db>.images/.")] = Path("echo-agent.sqlite"),
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development).")] = False,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MB.")] = 20.0,
    checkpointer_url: Annotated[str | None, typer.Option(help="postgresql://... URL to keep checkpoints in Postgres.")] = None,
    allow_host: Annotated[list[str] | None, typer.Option(help="Host name the server answers to besides localhost/127.0.0.1/::1 (repeatable; e.g. your proxy's name).")] = None,
    tokens_file: Annotated[Path | None, typer.Option(help="File of 'reviewer:token' lines: every API call needs a token, reviews are recorded under its reviewer. Required with a non-loopback --host.")] = None,
) -> None:
    """Serve the review page and the JSON API (needs the 'serve' extra)."""
    from .errors import EchoError
    from .server.cli import serve_command

    try:
        code = serve_command(host, port, db, reload, max_upload_mb=max_upload_mb, checkpointer_url=checkpointer_url,
                             allowed_hosts=tuple(allow_host or ()), tokens_file=tokens_file)
    except EchoError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    raise typer.Exit(code=code)


@app.command()
def schema() -> None:
    """Print the JSON schema of a Diagnosis."""
    from .schemas import Diagnosis

    sys.stdout.write(json.dumps(Diagnosis.json_schema(), indent=2) + "\n")


@app.command()
def organs() -> None:
    """List the registered organs."""
    from rich.console import Console
    from rich.table import Table

    from .organs import list_organs

    t = Table("organ", "labels", "detector classes", "category system", "weights")
    for s in list_organs():
        w = s.resolve_weights()
        t.add_row(s.name, ", ".join(s.image_labels), ", ".join(s.detector_labels), s.category_system or "-",
                  ("ok " if w and w.exists() else "missing ") + (w.name if w else "-"))
    Console().print(t)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
