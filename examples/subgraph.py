"""Compose the echo-agent graph as one node of your own LangGraph pipeline.

``build_graph`` returns an *uncompiled* StateGraph; compile it and add it as a node. The parent
shares the keys it wants to exchange (here ``image_path``, ``organ`` and ``diagnosis``).

Run:  python examples/subgraph.py
"""

from typing import TypedDict

from langgraph.graph import END, START, StateGraph

from echo_agent import Diagnosis, build_graph
from echo_agent.imaging import example_image


class Pipeline(TypedDict, total=False):
    image_path: str
    organ: str
    diagnosis: dict
    triage: str


def triage(state: Pipeline) -> dict:
    dx = Diagnosis.model_validate(state["diagnosis"])
    urgent = dx.category in {"4B", "4C", "5"} or dx.indeterminate
    return {"triage": "urgent review" if urgent else "routine"}


pipeline = StateGraph(Pipeline)
pipeline.add_node("echo", build_graph(max_tool_calls=6).compile())
pipeline.add_node("triage", triage)
pipeline.add_edge(START, "echo")
pipeline.add_edge("echo", "triage")
pipeline.add_edge("triage", END)

out = pipeline.compile().invoke({"image_path": str(example_image("breast_malignant")), "organ": "breast"})
print(out["triage"], "-", Diagnosis.model_validate(out["diagnosis"]).label)
