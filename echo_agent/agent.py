"""``EchoAgent``: the facade most users need.

>>> from echo_agent import EchoAgent                                    # doctest: +SKIP
>>> dx = EchoAgent().run("examples/images/breast_malignant.png",        # doctest: +SKIP
...                      context={"age": 52, "symptoms": "palpable lump"})
>>> print(dx.label, dx.probability, dx.box, dx.rationale)               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import ClinicalContextError, EchoError, EchoInputError
from .events import (
    AgentEvent,
    DiagnosisEvent,
    EvidenceEvent,
    PerceivedEvent,
    ReasonerEvent,
    ReviewRequestedEvent,
    ToolCalledEvent,
    ToolErrorEvent,
)
from .schemas import ClinicalContext, Diagnosis

if TYPE_CHECKING:
    from .config import AgentConfig

ImageInput = Any  # str | Path | bytes | PIL.Image.Image | np.ndarray | pydicom.Dataset
ContextInput = ClinicalContext | dict[str, Any] | str | None


def to_clinical(context: ContextInput) -> ClinicalContext | None:
    """Validate clinical context given as a ClinicalContext, a dict, or free text (-> ``notes``)."""
    if context is None:
        return None
    if isinstance(context, ClinicalContext):
        return context
    if isinstance(context, str):
        if not context.strip():
            return None
        context = {"notes": context}  # through the mapping path below, with its checks
    if isinstance(context, dict):
        unknown = sorted(set(context) - set(ClinicalContext.model_fields))
        if unknown:
            raise ClinicalContextError(
                f"unknown clinical context key(s) {unknown}; allowed: {sorted(ClinicalContext.model_fields)}"
            )
        try:
            return ClinicalContext.model_validate(context)
        except Exception as exc:
            first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise ClinicalContextError(f"invalid clinical context {where}: {first.get('msg')}") from None
    raise ClinicalContextError(
        f"clinical context must be a dict, a ClinicalContext or a string, got {type(context).__name__}"
    )


@dataclass(frozen=True)
class ReviewTicket:
    """A run paused for human review: resume it with :meth:`EchoAgent.resume`."""

    thread_id: str
    diagnosis: Diagnosis


class EchoAgent:
    """Run the invoke-and-reason agent on ultrasound images.

    Args:
        reasoner: a LangChain chat model that supports tool calling (default: the embedded policy).
        organ: fix the organ for every run (default: route each image; a run may override it).
        toolkit: detectors, captioner, retriever, image store (see :class:`echo_agent.tools.Toolkit`).
        fusion / finalizer: see :func:`echo_agent.build_graph`.
        router: ``f(image) -> (organ | None, confidence)``; default: the packaged organ router.
        check_given_organ: with an explicit organ, still let the router check that the image is a
            usable ultrasound image (a blank frame or noise gets an indeterminate Diagnosis with the
            reason; another organ a warning). ``False`` skips the check (``router=None`` too).
        max_tool_calls: tool-call budget per image.
        review: pause each run for a human reviewer (use :meth:`start` / :meth:`resume`).
        checkpointer: any LangGraph checkpointer (an in-memory one is used when review is on).
        max_pixels: images above this pixel count are refused (decompression-bomb guard).
        prefetch: in :meth:`batch`, run the detector on each chunk of images in one batched forward
            pass before the graphs start (default: on with the embedded policy, which always calls
            the detector first; results are the same either way).
    """

    def __init__(
        self,
        reasoner: Any = None,
        *,
        organ: str | None = None,
        toolkit: Any = None,
        fusion: Any = None,
        finalizer: Any = None,
        router: Any = "default",
        max_tool_calls: int = 8,
        review: bool = False,
        checkpointer: Any = None,
        max_pixels: int = 12_000_000,  # imaging.io.DEFAULT_MAX_PIXELS (a test keeps them equal)
        prefetch: bool | None = None,
        check_given_organ: bool = True,
    ) -> None:
        from .graph import build_graph
        from .organs import get_organ
        from .tools import Toolkit

        if organ is not None:
            get_organ(organ)
        self.organ = organ
        self.toolkit = toolkit or Toolkit()
        self.max_pixels = max_pixels
        self.max_tool_calls = int(max_tool_calls)
        self.prefetch = reasoner is None if prefetch is None else bool(prefetch)
        self.review = review
        if router == "default":
            from .detectors.router_head import default_router

            router = default_router
        if review and checkpointer is None:
            from langgraph.checkpoint.memory import InMemorySaver

            checkpointer = InMemorySaver()
        self.checkpointer = checkpointer
        self._builder = build_graph(
            reasoner, toolkit=self.toolkit, fusion=fusion, finalizer=finalizer, router=router,
            max_tool_calls=max_tool_calls, review=review, check_given_organ=check_given_organ,
        )
        self.graph = self._builder.compile(checkpointer=checkpointer)
        #: the AgentConfig this agent was built from (:meth:`from_config`), else None
        self.config: AgentConfig | None = None

    @classmethod
    def from_config(cls, config: AgentConfig | Mapping[str, Any] | str | Path | None = None, **runtime: Any) -> EchoAgent:
        """Build the agent an :class:`~echo_agent.config.AgentConfig` describes (a config, a mapping,
        or a JSON/YAML file; ``None``: the packaged default).

        ``runtime`` takes the resources that are not data: ``checkpointer=``, ``store=`` (an
        ``ImageStore``) or ``toolkit=`` (a ready :class:`~echo_agent.tools.Toolkit`). The config is
        kept as ``agent.config``.
        """
        from .config import AgentConfig

        cfg = AgentConfig.load(config) if config is not None else AgentConfig()
        agent = cls(**cfg.agent_kwargs(**runtime))
        agent.config = cfg
        return agent

    @classmethod
    def from_endpoint(
        cls,
        base_url: str,
        model: str,
        *,
        api_key: str = "EMPTY",
        images_in_tool_messages: bool = True,
        llm_finalizer: bool | Literal["json_schema", "text"] = True,
        box_convention: Literal["relative1000", "absolute"] = "relative1000",
        chat_kwargs: dict[str, Any] | None = None,
        **agent_kwargs: Any,
    ) -> EchoAgent:
        """An agent whose reasoner is the multimodal model served at an OpenAI-compatible endpoint
        (vLLM, SGLang, Ollama, a hosted API; needs the ``openai`` extra).

        Args:
            base_url: the server's OpenAI-compatible root, e.g. ``'http://localhost:8000/v1'``.
            model: the served model name (``--served-model-name`` of vLLM).
            api_key: the server's key (``'EMPTY'`` for a local vLLM without one).
            images_in_tool_messages: ``False`` for servers that reject images inside tool messages;
                the detector overlay then follows the tool results in a user message.
            llm_finalizer: also ask the model for the final Diagnosis (structured output, validated,
                one repair, fusion fallback: :class:`~echo_agent.reasoners.LLMFinalizer`); ``'text'``
                asks for JSON in plain text, for servers without JSON-schema output.
            box_convention: ``'absolute'`` for Qwen2.5-VL, ``'relative1000'`` (default) otherwise.
            chat_kwargs: more settings for :func:`echo_agent.reasoners.chat_model_from_endpoint`.
            agent_kwargs: passed to :class:`EchoAgent` (``organ``, ``toolkit``, ``max_tool_calls``, ...).

        The same agent as a serialisable config: ``AgentConfig(reasoner=EndpointReasoner(...))``.
        """
        from .config import EndpointReasoner, endpoint_parts
        from .tools import Toolkit

        toolkit = agent_kwargs.pop("toolkit", None) or Toolkit()
        llm, finalizer = endpoint_parts(EndpointReasoner(
            base_url=base_url, model=model, api_key=api_key, images_in_tool_messages=images_in_tool_messages,
            llm_finalizer=llm_finalizer, box_convention=box_convention, chat_kwargs=chat_kwargs or {},
        ), toolkit.get_store())
        if agent_kwargs.get("finalizer") is None:
            agent_kwargs["finalizer"] = finalizer
        return cls(reasoner=llm, toolkit=toolkit, **agent_kwargs)

    # -- inputs ---------------------------------------------------------------------------------------
    def prepare_input(
        self, image: ImageInput, *, organ: str | None = None, context: ContextInput = None, frame: int | None = None
    ) -> dict[str, Any]:
        """Validate and store the image; return the graph input dict."""
        from .imaging import load_image
        from .organs import get_organ

        organ = organ or self.organ
        if organ is not None:
            get_organ(organ)
        clinical = to_clinical(context)
        loaded = load_image(image, frame=frame, max_pixels=self.max_pixels)
        ref = loaded.to_ref(self.toolkit.get_store())
        inp: dict[str, Any] = {"image": ref, "organ": organ}
        if clinical is not None:
            inp["clinical"] = clinical.model_dump(exclude_none=True)
        return inp

    def _config(self, thread_id: str | None) -> dict[str, Any]:
        if self.checkpointer is None:
            return {}
        return {"configurable": {"thread_id": thread_id or uuid.uuid4().hex}}

    def _begin(self, image: ImageInput, organ: str | None, context: ContextInput, frame: int | None,
               thread_id: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(graph input, run config)`` of a new run."""
        return self.prepare_input(image, organ=organ, context=context, frame=frame), self._config(thread_id)

    # -- the run loop: every entry point drains it ----------------------------------------------------
    def _drain(self, source: Any, config: dict[str, Any], first_step: int = 0, *,
               events: bool = True) -> Iterator[AgentEvent]:
        """The events of one graph run (a new input or a resume ``Command``), numbered in order.

        ``events=False`` is for callers that only need the outcome: the run yields just its final
        :class:`DiagnosisEvent` or :class:`ReviewRequestedEvent`, without LangGraph's custom stream
        (which runs each step through a thread hand-off: about 6 ms a run on a 2-core machine).
        """
        loop = _RunLoop(config, first_step, events=events)
        for chunk in self.graph.stream(source, config or None, stream_mode=loop.modes):
            yield from loop.events(chunk)
        yield from loop.outcome()

    async def _adrain(self, source: Any, config: dict[str, Any], first_step: int = 0, *,
                      events: bool = True) -> AsyncIterator[AgentEvent]:
        """Async :meth:`_drain`."""
        loop = _RunLoop(config, first_step, events=events)
        async for chunk in self.graph.astream(source, config or None, stream_mode=loop.modes):
            for ev in loop.events(chunk):
                yield ev
        for ev in loop.outcome():
            yield ev

    # -- single image -------------------------------------------------------------------------------
    def run(
        self,
        image: ImageInput,
        *,
        organ: str | None = None,
        context: ContextInput = None,
        frame: int | None = None,
        thread_id: str | None = None,
    ) -> Diagnosis:
        """Diagnose one image. ``context`` is a dict of :class:`ClinicalContext` fields or free text."""
        return _final(self._drain(*self._begin(image, organ, context, frame, thread_id), events=False))

    def run_state(
        self,
        image: ImageInput,
        *,
        organ: str | None = None,
        context: ContextInput = None,
        frame: int | None = None,
        thread_id: str | None = None,
    ) -> dict[str, Any]:
        """Diagnose one image and return the graph's final state instead of the Diagnosis alone: the
        image reference (``image``), ``organ``, ``clinical``, the whole conversation (``messages``:
        the reasoner's tool calls and the tools' results), the typed ``evidence`` records,
        ``warnings``, and
        ``diagnosis`` (a JSON dict; ``Diagnosis.model_validate`` gives the object). For tools that
        learn from or score the run itself (fusion fitting, traces, policy evaluation). Not for
        ``review=True`` agents, whose runs pause: use :meth:`start` / :meth:`resume`."""
        if self.review:
            raise EchoError("run_state() runs to the end; a review agent pauses: use start()/resume()")
        inp, config = self._begin(image, organ, context, frame, thread_id)
        # the graph's output schema leaves the clinical context out; it is the run's input
        return {**self.graph.invoke(inp, config or None), "clinical": inp.get("clinical")}

    async def arun(
        self,
        image: ImageInput,
        *,
        organ: str | None = None,
        context: ContextInput = None,
        frame: int | None = None,
        thread_id: str | None = None,
    ) -> Diagnosis:
        """Async :meth:`run`."""
        return await _afinal(self._adrain(*self._begin(image, organ, context, frame, thread_id), events=False))

    # -- review -----------------------------------------------------------------------------------------
    def start(
        self, image: ImageInput, *, organ: str | None = None, context: ContextInput = None,
        frame: int | None = None, thread_id: str | None = None,
    ) -> ReviewTicket:
        """Run until the review pause and return the ticket with the agent's Diagnosis."""
        if not self.review:
            raise EchoError("start()/resume() need EchoAgent(review=True)")
        for ev in self._drain(*self._begin(image, organ, context, frame, thread_id), events=False):
            if isinstance(ev, ReviewRequestedEvent):
                return ReviewTicket(str(ev.thread_id), ev.diagnosis)
        raise EchoError("the run finished without pausing for review")

    def resume(self, ticket: ReviewTicket | str, decision: dict[str, Any] | Any) -> Diagnosis:
        """Resume a paused run with the reviewer's decision (see :class:`echo_agent.graph.ReviewDecision`)."""
        config, decision = _resume_args(ticket, decision)
        return _final(self._drain(_resume_command(self.graph.get_state(config), config, decision), config, events=False))

    async def astream_resume(
        self, ticket: ReviewTicket | str, decision: dict[str, Any] | Any, *, first_step: int = 0
    ) -> AsyncIterator[AgentEvent]:
        """Async: resume a paused run with the reviewer's decision and yield its events (ending with
        the final :class:`DiagnosisEvent`); ``first_step`` continues the paused run's event numbering."""
        config, decision = _resume_args(ticket, decision)
        command = _resume_command(await self.graph.aget_state(config), config, decision)
        async for ev in self._adrain(command, config, first_step=first_step):
            yield ev

    # -- streaming ----------------------------------------------------------------------------------------
    def stream(
        self, image: ImageInput, *, organ: str | None = None, context: ContextInput = None,
        frame: int | None = None, thread_id: str | None = None,
    ) -> Iterator[AgentEvent]:
        """Yield typed events as the run progresses: perceived, reasoner, tool called, evidence,
        tool error, review requested, diagnosis."""
        yield from self._drain(*self._begin(image, organ, context, frame, thread_id))

    async def astream(
        self, image: ImageInput, *, organ: str | None = None, context: ContextInput = None,
        frame: int | None = None, thread_id: str | None = None,
    ) -> AsyncIterator[AgentEvent]:
        """Async :meth:`stream`."""
        async for ev in self._adrain(*self._begin(image, organ, context, frame, thread_id)):
            yield ev

    # -- many images ----------------------------------------------------------------------------------
    def batch(
        self,
        images: Sequence[ImageInput],
        *,
        organ: str | None = None,
        contexts: Sequence[ContextInput] | None = None,
        max_concurrency: int | None = None,
    ) -> list[Diagnosis | EchoError]:
        """Diagnose many images. The result list is aligned with ``images``; an item that fails holds
        its error (an :class:`EchoError`) and the other items still complete.

        The default agent runs its detector on up to 16 images in one batched forward pass, then
        the graphs one after the other (``max_concurrency`` > 1: that many at a time, in threads).
        """
        if contexts is not None and len(contexts) != len(images):
            raise EchoInputError(f"contexts has {len(contexts)} entries for {len(images)} images; give one per image")
        results: list[Diagnosis | EchoError | None] = [None] * len(images)
        # Chunk by chunk, inputs included: an image is stored only when its chunk is about to run,
        # so a long batch of arrays never pushes its first images out of the image store's LRU
        # before their graphs read them.
        for start in range(0, len(images), _PREFETCH_CHUNK):
            inputs, configs, slots = [], [], []
            for i in range(start, min(start + _PREFETCH_CHUNK, len(images))):
                try:
                    inputs.append(self.prepare_input(images[i], organ=organ, context=contexts[i] if contexts else None))
                    configs.append(self._config(None))
                    slots.append(i)
                except EchoError as exc:
                    results[i] = exc
            if not inputs:
                continue
            with contextlib.ExitStack() as held:
                if self.prefetch:
                    self._prefetch(inputs, held)
                outs = self._invoke_all(inputs, configs, max_concurrency)
            for i, out in zip(slots, outs):
                if isinstance(out, EchoError) or not isinstance(out, BaseException):
                    results[i] = out
                else:
                    results[i] = EchoError(f"{type(out).__name__}: {out}")
                    results[i].__cause__ = out
        return results  # type: ignore[return-value]

    def _invoke_all(self, inputs: Sequence[dict[str, Any]], configs: Sequence[dict[str, Any]],
                    max_concurrency: int | None) -> list[Any]:
        """Run the graph on each input: its Diagnosis, or the exception in its slot instead of raised.

        One after the other by default: the detector's batched pass has already run, the rest is
        mostly Python, and ``graph.batch``'s thread-pool machinery measured about 10 ms of CPU per
        image on this project's 2-core machine (docs/benchmarks.md). ``max_concurrency > 1`` runs
        that many graphs at a time in threads.
        """

        def one(pair: tuple[dict[str, Any], dict[str, Any]]) -> Any:
            try:
                return _final(self._drain(pair[0], pair[1], events=False))
            except Exception as exc:  # returned, not raised: the other items still complete
                return exc

        pairs = list(zip(inputs, configs))
        if not max_concurrency or max_concurrency <= 1 or len(pairs) <= 1:
            return [one(p) for p in pairs]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
            return list(pool.map(one, pairs))

    def _prefetch(self, inputs: Sequence[dict[str, Any]], held: contextlib.ExitStack) -> None:
        """Batch the first detector call of every image whose organ is known: one forward pass for
        the chunk instead of one per image, held (:meth:`Toolkit.prefetched`) until ``held`` closes."""
        by_organ: dict[str, list[str]] = {}
        store = self.toolkit.get_store()
        for inp in inputs:
            if inp.get("organ"):
                by_organ.setdefault(inp["organ"], []).append(inp["image"]["id"])
                try:  # the captioner's whole-image analyses run in a background thread meanwhile
                    self.toolkit.prefetch_image_context(store.get(inp["image"]))
                except EchoError:
                    pass  # the run itself reports what is wrong with this image
        for organ, ids in by_organ.items():
            try:
                held.enter_context(self.toolkit.prefetched(organ, ids))
            except EchoError:
                pass  # a bad image or missing weights: each run reports its own error


#: Images per batched detector pass in :meth:`EchoAgent.batch` (within the detector's output cache
#: and the toolkit's preprocessing cache).
_PREFETCH_CHUNK = 16


def agent_from_endpoint(base_url: str, model: str, **kwargs: Any) -> EchoAgent:
    """Same as :meth:`EchoAgent.from_endpoint` (kept for existing code and ``functools.partial``)."""
    return EchoAgent.from_endpoint(base_url, model, **kwargs)


def _check_decision(snapshot: Any, decision: dict[str, Any]) -> None:
    """Dry-run the review on the paused Diagnosis. A node that fails after ``interrupt`` keeps the
    bad resume value in the checkpoint and replays it on every later resume, so an invalid
    decision must be refused before it reaches the graph."""
    from .graph.review import ReviewDecision, apply_review
    from .organs import get_organ

    try:
        dec = ReviewDecision.model_validate(decision)
    except Exception as exc:
        raise EchoInputError(f"the review decision is invalid: {exc}") from None
    if not dec.reviewer:
        raise EchoInputError("a review needs a reviewer id: set 'reviewer' in the decision")
    paused = Diagnosis.model_validate(snapshot.values["diagnosis"])
    apply_review(paused, dec, get_organ(paused.organ), dec.reviewer)


class _RunLoop:
    """Turns one graph run's stream into numbered :mod:`echo_agent.events`.

    With ``events``, it asks LangGraph for the custom stream, where the nodes write their typed
    events (``runtime.stream_writer``), and for node updates, which carry the review pause
    (``__interrupt__``, turned into a :class:`ReviewRequestedEvent`). Without, it asks only for the
    state after each step and, at the end, yields the outcome: the final state's Diagnosis, or the
    review pause.
    """

    def __init__(self, config: dict[str, Any], first_step: int = 0, *, events: bool = True) -> None:
        self.thread_id = (config.get("configurable") or {}).get("thread_id")
        self.step = first_step
        self.with_events = events
        self.modes: list[str] = ["custom", "updates"] if events else ["values"]
        self._last: dict[str, Any] = {}
        self._paused = False

    def _numbered(self, ev: Any) -> AgentEvent:
        ev = ev.model_copy(update={"step": self.step})
        self.step += 1
        return ev

    def events(self, item: tuple[str, Any]) -> Iterator[AgentEvent]:
        mode, chunk = item
        if mode == "custom":
            if isinstance(chunk, _EVENT_TYPES):
                yield self._numbered(chunk)
        elif isinstance(chunk, dict) and "__interrupt__" in chunk:
            self._paused = True
            for intr in chunk["__interrupt__"]:
                value = getattr(intr, "value", {}) or {}
                if isinstance(value, dict) and "diagnosis" in value:
                    yield self._numbered(ReviewRequestedEvent(
                        thread_id=self.thread_id, diagnosis=Diagnosis.model_validate(value["diagnosis"])))
        elif mode == "values" and isinstance(chunk, dict):
            self._last = chunk

    def outcome(self) -> Iterator[AgentEvent]:
        """Without events: the final Diagnosis (nothing when the run paused; the pause was yielded)."""
        if not self.with_events and not self._paused and self._last.get("diagnosis") is not None:
            yield self._numbered(DiagnosisEvent(diagnosis=Diagnosis.model_validate(self._last["diagnosis"])))


_EVENT_TYPES = (PerceivedEvent, ReasonerEvent, ToolCalledEvent, EvidenceEvent, ToolErrorEvent,
                ReviewRequestedEvent, DiagnosisEvent)
_PAUSED = "this agent pauses every run for review; use agent.start(...) and agent.resume(...) instead of run()"


class _Outcome:
    """The Diagnosis a drained run ends with (a review pause is an error for run/resume/batch)."""

    def __init__(self) -> None:
        self.dx: Diagnosis | None = None

    def see(self, ev: AgentEvent) -> None:
        if isinstance(ev, ReviewRequestedEvent):
            raise EchoError(_PAUSED)
        if isinstance(ev, DiagnosisEvent):
            self.dx = ev.diagnosis

    def diagnosis(self) -> Diagnosis:
        if self.dx is None:
            raise EchoError("the run ended without a diagnosis")
        return self.dx


def _final(events: Iterator[AgentEvent]) -> Diagnosis:
    out = _Outcome()
    for ev in events:
        out.see(ev)
    return out.diagnosis()


async def _afinal(events: AsyncIterator[AgentEvent]) -> Diagnosis:
    out = _Outcome()
    async for ev in events:
        out.see(ev)
    return out.diagnosis()


def _resume_args(ticket: ReviewTicket | str, decision: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run config, decision dict)`` of a resume."""
    from .graph import ReviewDecision

    thread_id = ticket.thread_id if isinstance(ticket, ReviewTicket) else ticket
    if isinstance(decision, ReviewDecision):
        decision = decision.model_dump(exclude_none=True)
    return {"configurable": {"thread_id": thread_id}}, decision


def _resume_command(snapshot: Any, config: dict[str, Any], decision: dict[str, Any]) -> Any:
    """The ``Command`` that resumes a paused run, after checking it is paused and the decision is valid."""
    from langgraph.types import Command

    if not snapshot.next:
        raise EchoInputError(f"thread {config['configurable']['thread_id']!r} is not waiting for review")
    _check_decision(snapshot, decision)
    return Command(resume=decision)
