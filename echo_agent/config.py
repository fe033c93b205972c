"""``AgentConfig``: everything that decides how an agent is built, as plain data.

One description of an agent for every place that builds one — the CLI, the review server, batch
engines and their process/Ray workers, the evaluation harness, fusion training and the LangGraph
server module — so they cannot drift apart. It is a frozen pydantic model: JSON/YAML in and out,
picklable (a worker receives the config and builds its own agent), and the only place environment
variables about the agent are read (:meth:`AgentConfig.from_env`).

>>> from echo_agent import AgentConfig, EchoAgent                      # doctest: +SKIP
>>> cfg = AgentConfig(organ="breast", fusion="heuristic", max_tool_calls=6)   # doctest: +SKIP
>>> agent = EchoAgent.from_config(cfg)                                 # doctest: +SKIP
>>> AgentConfig.load("agent.yaml") == AgentConfig.model_validate_json(cfg.model_dump_json())  # doctest: +SKIP

Runtime resources that are not data (a checkpointer, an image store, a custom toolkit object) are
passed to :meth:`echo_agent.EchoAgent.from_config` beside the config.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import EchoInputError

#: Environment variables :meth:`AgentConfig.from_env` reads (nothing else in the package reads
#: variables about how the agent is built).
ENV_VARS = {
    "ECHO_AGENT_ORGAN": "organ: fix the organ of every run",
    "ECHO_AGENT_LLM_BASE_URL": "reasoner: an OpenAI-compatible endpoint (with ECHO_AGENT_LLM_MODEL)",
    "ECHO_AGENT_LLM_MODEL": "reasoner: the served model's name",
    "ECHO_AGENT_LLM_API_KEY": "reasoner: the endpoint's key (default 'EMPTY')",
    "ECHO_AGENT_TOOLKIT": "toolkit: 'package.module:factory', called as factory(store=...)",
    "ECHO_AGENT_IMAGE_STORE": "image_store: a folder that keeps stored images across restarts",
}


class EndpointReasoner(BaseModel):
    """A multimodal model served behind an OpenAI-compatible API (vLLM, SGLang, Ollama, hosted);
    see :meth:`echo_agent.EchoAgent.from_endpoint` for the fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["endpoint"] = "endpoint"
    base_url: str
    model: str
    api_key: str = "EMPTY"
    images_in_tool_messages: bool = True
    llm_finalizer: bool | Literal["json_schema", "text"] = True
    box_convention: Literal["relative1000", "absolute"] = "relative1000"
    chat_kwargs: dict[str, Any] = Field(default_factory=dict)


class AgentConfig(BaseModel):
    """How to build an :class:`~echo_agent.EchoAgent` (every field has the packaged default).

    Attributes:
        organ: fix the organ for every run (default: the router decides per image).
        reasoner: ``None`` for the embedded policy, or an :class:`EndpointReasoner`.
        fusion: ``"learned"`` (the packaged calibrated fusion where parameters ship, the default) or
            ``"heuristic"`` (the transparent, uncalibrated one).
        fusion_params: per organ, a fusion-parameters JSON file to use instead of the packaged one.
        detectors: per organ, detector weights (``.onnx`` / ``.pt``) instead of the packaged ones.
        classifiers: per organ, second-look classifier weights (``.onnx``), or ``None`` to run
            without the second look for that organ.
        toolkit: ``"package.module:factory"``, called as ``factory(store=...)`` to make the Toolkit
            (default: ``Toolkit(store=...)``); ``detectors`` / ``classifiers`` are applied on top.
        image_store: a folder the image store also writes to, so references survive a restart.
        router: use the packaged organ router (``False``: runs must name the organ).
        check_given_organ, max_tool_calls, review, max_pixels, prefetch: as for ``EchoAgent``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    organ: str | None = None
    reasoner: EndpointReasoner | None = None
    fusion: Literal["learned", "heuristic"] = "learned"
    fusion_params: dict[str, Path] = Field(default_factory=dict)
    detectors: dict[str, Path] = Field(default_factory=dict)
    classifiers: dict[str, Path | None] = Field(default_factory=dict)
    toolkit: str | None = None
    image_store: Path | None = None
    router: bool = True
    check_given_organ: bool = True
    max_tool_calls: int = Field(default=8, ge=0)
    review: bool = False
    max_pixels: int = Field(default=12_000_000, ge=1)
    prefetch: bool | None = None

    @field_validator("toolkit")
    @classmethod
    def _factory_spec(cls, v: str | None) -> str | None:
        if v is not None:
            module, _, attr = v.partition(":")
            if not module or not attr:
                raise ValueError(f"toolkit={v!r} must look like 'package.module:factory'")
        return v

    @model_validator(mode="after")
    def _heuristic_takes_no_params(self) -> AgentConfig:
        if self.fusion == "heuristic" and self.fusion_params:
            raise ValueError("fusion_params only apply to the learned fusion (fusion='learned')")
        return self

    # -- in and out ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path | Mapping[str, Any] | AgentConfig) -> AgentConfig:
        """A config from a JSON or YAML file, a mapping, or a config (returned as it is).

        Raises :class:`~echo_agent.errors.EchoInputError` naming the file and the problem.
        """
        if isinstance(source, AgentConfig):
            return source
        where = "the agent config"
        try:
            if isinstance(source, Mapping):
                return cls.model_validate(dict(source))
            path = Path(source)
            where = str(path)
            if not path.is_file():
                raise EchoInputError(f"agent config {path} does not exist")
            text = path.read_text("utf-8")
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                return cls.model_validate(yaml.safe_load(text) or {})
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise EchoInputError(f"{where} is not a valid AgentConfig: {_describe(exc)}") from None
        except ValueError as exc:  # JSON/YAML syntax
            raise EchoInputError(f"{where} could not be read: {exc}") from None

    def replace(self, **changes: Any) -> AgentConfig:
        """A copy with ``changes`` applied and validated (raises :class:`EchoInputError`)."""
        return AgentConfig.load({**self.model_dump(), **changes})

    def dump(self, path: str | Path) -> Path:
        """Write the config as JSON or YAML (by the file's suffix); refuses to overwrite a file."""
        path = Path(path)
        if path.exists():
            raise EchoInputError(f"{path} exists; choose another file name")
        data = self.model_dump(mode="json", exclude_defaults=True)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
        else:
            path.write_text(self.model_dump_json(indent=1, exclude_defaults=True), "utf-8")
        return path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> AgentConfig:
        """The config the ``ECHO_AGENT_*`` variables describe (:data:`ENV_VARS`), then ``overrides``."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        if env.get("ECHO_AGENT_ORGAN"):
            data["organ"] = env["ECHO_AGENT_ORGAN"]
        base_url = env.get("ECHO_AGENT_LLM_BASE_URL")
        if base_url:
            model = env.get("ECHO_AGENT_LLM_MODEL")
            if not model:
                raise EchoInputError("ECHO_AGENT_LLM_BASE_URL is set but ECHO_AGENT_LLM_MODEL is not; name the served model")
            data["reasoner"] = EndpointReasoner(base_url=base_url, model=model,
                                                api_key=env.get("ECHO_AGENT_LLM_API_KEY") or "EMPTY")
        if env.get("ECHO_AGENT_TOOLKIT"):
            data["toolkit"] = env["ECHO_AGENT_TOOLKIT"]
        if env.get("ECHO_AGENT_IMAGE_STORE"):
            data["image_store"] = Path(env["ECHO_AGENT_IMAGE_STORE"]).expanduser()
        data.update(overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise EchoInputError(f"the ECHO_AGENT_* environment does not describe a valid agent: {_describe(exc)}") from None

    # -- the parts -------------------------------------------------------------------------------------
    def build_parts(self, *, store: Any = None, toolkit: Any = None) -> AgentParts:
        """The objects an agent is made of (toolkit, reasoner, fusion, finaliser, router).

        ``store`` (an ``ImageStore``) or a ready ``toolkit`` replace the config's own; the config's
        ``detectors`` / ``classifiers`` are applied to whichever toolkit is used.
        """
        from .imaging.store import ImageStore
        from .tools import Toolkit

        if toolkit is None:
            if store is None:
                store = ImageStore(directory=self.image_store) if self.image_store is not None else None
            toolkit = _call_factory(self.toolkit, store) if self.toolkit else Toolkit(store=store)
        elif store is not None and toolkit.get_store() is not store:
            raise EchoInputError("give either a toolkit or a store to build the agent with, not both")
        self._apply_weights(toolkit)
        reasoner = finalizer = None
        if self.reasoner is not None:
            reasoner, finalizer = endpoint_parts(self.reasoner, toolkit.get_store())
        return AgentParts(toolkit=toolkit, reasoner=reasoner, fusion=self._fusion(), finalizer=finalizer,
                          router=_default_router() if self.router else None)

    def agent_kwargs(self, **runtime: Any) -> dict[str, Any]:
        """Keyword arguments for ``EchoAgent(...)``: the built parts, the config's settings and the
        runtime resources (``checkpointer``; ``store`` / ``toolkit`` go to :meth:`build_parts`)."""
        parts = self.build_parts(store=runtime.pop("store", None), toolkit=runtime.pop("toolkit", None))
        unknown = sorted(set(runtime) - {"checkpointer"})
        if unknown:
            raise TypeError(f"unexpected runtime argument(s) for an agent built from a config: {', '.join(unknown)}")
        return {
            "reasoner": parts.reasoner, "organ": self.organ, "toolkit": parts.toolkit, "fusion": parts.fusion,
            "finalizer": parts.finalizer, "router": parts.router, "max_tool_calls": self.max_tool_calls,
            "review": self.review, "checkpointer": runtime.get("checkpointer"), "max_pixels": self.max_pixels,
            "prefetch": self.prefetch, "check_given_organ": self.check_given_organ,
        }

    def _apply_weights(self, toolkit: Any) -> None:
        from .detectors import load_detector, load_region_classifier
        from .organs import get_organ

        for organ, weights in self.detectors.items():
            toolkit.detectors[organ] = load_detector(_existing(weights, f"detector weights for {organ}"),
                                                     labels=get_organ(organ).detector_labels)
        for organ, weights in self.classifiers.items():
            toolkit.classifiers[organ] = (None if weights is None else
                                          load_region_classifier(_existing(weights, f"classifier weights for {organ}")))

    def _fusion(self) -> Any:
        from .fusion import HeuristicFusion, LearnedFusion, load_fusion_params

        if self.fusion == "heuristic":
            return HeuristicFusion()
        if not self.fusion_params:
            return LearnedFusion()
        params = {}
        for organ in {*self.fusion_params, *_registered_organs()}:
            path = self.fusion_params.get(organ)
            p = load_fusion_params(organ, str(path) if path is not None else None)
            if p is not None:
                if p.organ != organ:
                    raise EchoInputError(f"fusion parameters {path} are for organ {p.organ!r}, not {organ!r}")
                params[organ] = p
        return LearnedFusion(params)


@dataclass(frozen=True)
class AgentParts:
    """What :meth:`AgentConfig.build_parts` makes: the objects an ``EchoAgent`` is built from."""

    toolkit: Any
    reasoner: Any
    fusion: Any
    finalizer: Any
    router: Any


class AgentFactory(Protocol):
    """Anything that builds the agent a server, batch engine or worker drives: called with the
    runtime resources it is given (the review server passes ``checkpointer=`` and ``store=``;
    batch workers pass nothing). ``functools.partial(EchoAgent.from_config, config)`` is one."""

    def __call__(self, **runtime: Any) -> Any: ...


def _describe(exc: ValidationError) -> str:
    """``field: problem; field: problem`` (one line, the input value included)."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(the config)"
        given = f" (got {e['input']!r})" if e.get("type") != "missing" and not isinstance(e.get("input"), dict) else ""
        parts.append(f"{loc}: {e['msg']}{given}")
    return "; ".join(parts)


def _existing(path: Path, what: str) -> Path:
    if not Path(path).expanduser().is_file():
        raise EchoInputError(f"{what}: {path} does not exist")
    return Path(path).expanduser()


def _call_factory(spec: str, store: Any) -> Any:
    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise EchoInputError(f"toolkit factory {spec!r} could not be loaded: {exc}") from None
    return factory(store=store) if store is not None else factory()


def endpoint_parts(cfg: EndpointReasoner, store: Any) -> tuple[Any, Any]:
    """``(chat model, LLM finaliser or None)`` for an endpoint reasoner, images read from ``store``."""
    from .reasoners.openai_compat import chat_model_from_endpoint

    llm = chat_model_from_endpoint(
        cfg.base_url, cfg.model, api_key=cfg.api_key, images_in_tool_messages=cfg.images_in_tool_messages,
        box_convention=cfg.box_convention, image_store=store, **cfg.chat_kwargs,
    )
    finalizer = None
    if cfg.llm_finalizer:
        from .reasoners.llm_finalizer import LLMFinalizer

        finalizer = LLMFinalizer(llm, structured=cfg.llm_finalizer if isinstance(cfg.llm_finalizer, str) else "json_schema")
    return llm, finalizer


def _default_router() -> Any:
    from .detectors.router_head import default_router

    return default_router


def _registered_organs() -> list[str]:
    from .organs import list_organs

    return [s.name for s in list_organs()]


__all__ = ["ENV_VARS", "AgentConfig", "AgentFactory", "AgentParts", "EndpointReasoner", "endpoint_parts"]
