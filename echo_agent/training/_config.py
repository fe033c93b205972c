"""Config-file plumbing shared by the SFT and GRPO runners: YAML -> dataclass, ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _coerce(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> T:
    """Build a config dataclass from a YAML file plus ``key=value`` overrides (values parsed as YAML).

    Unknown keys raise ``ValueError`` listing the valid ones, so a typo in a config file fails early.
    """
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text("utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping of field: value")
        data.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        data[k.strip()] = _coerce(v)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
    return cls(**data)


def dump_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write a config dataclass as YAML (the run's record of what it was started with)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), sort_keys=False), "utf-8")


def help_table(cls: type) -> str:
    """``field (default): help`` lines of a config dataclass (for ``--help-config``)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>"  # type: ignore[misc]
        )
        lines.append(f"{f.name} ({default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def offline_env() -> None:
    """Never reach the Hugging Face Hub from a training run (set before transformers is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def run_cli(doc: str, config_cls: type, runner: str, argv: list[str] | None = None) -> int:
    """The command line of ``tools/train_sft.py`` / ``tools/train_grpo.py``: ``--config FILE``,
    ``key=value`` overrides, ``--help-config``; ``runner`` is ``'module:function'`` (imported late)."""
    import argparse
    import importlib

    offline_env()
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (configs/training/*.yaml).")
    ap.add_argument("--help-config", action="store_true", help="List the config fields and exit.")
    ap.add_argument("overrides", nargs="*", help="key=value overrides.")
    a = ap.parse_args(argv)
    if a.help_config:
        print(help_table(config_cls))
        return 0
    cfg = load_config(config_cls, a.config, a.overrides)
    module, fn = runner.split(":")
    summary = getattr(importlib.import_module(module), fn)(cfg)
    print(json.dumps(summary, indent=1, default=str))
    return 0
