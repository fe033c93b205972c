"""AgentConfig: one serialisable description every entry point builds its agent from."""

from __future__ import annotations

import functools
import json
import pickle

import pytest
from _fakes import fake_toolkit

from echo_agent import AgentConfig, EchoAgent, EndpointReasoner
from echo_agent.config import ENV_VARS, AgentFactory
from echo_agent.errors import EchoInputError
from echo_agent.fusion import HeuristicFusion, LearnedFusion
from echo_agent.imaging import ImageStore, example_image
from echo_agent.organs import get_organ


def test_default_config_builds_the_packaged_agent_and_is_kept_on_it():
    agent = EchoAgent.from_config()
    assert agent.config == AgentConfig()
    assert isinstance(agent._builder, object) and agent.organ is None and agent.review is False
    direct = EchoAgent()
    assert direct.config is None
    img = example_image("breast_malignant")
    a, b = agent.run(img, organ="breast"), direct.run(img, organ="breast")
    assert (a.label, a.probabilities, a.category) == (b.label, b.probabilities, b.category)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trips_through_json_and_yaml_and_never_overwrites(tmp_path, suffix):
    cfg = AgentConfig(organ="kidney", fusion="heuristic", max_tool_calls=5, classifiers={"kidney": None},
                      reasoner=EndpointReasoner(base_url="http://h:8000/v1", model="m", llm_finalizer="text"))
    path = cfg.dump(tmp_path / f"agent{suffix}")
    assert AgentConfig.load(path) == cfg
    assert AgentConfig.load(json.loads(cfg.model_dump_json())) == cfg
    with pytest.raises(EchoInputError, match="exists"):
        cfg.dump(path)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_bad_configs_are_refused_with_the_file_and_the_field(tmp_path):
    with pytest.raises(EchoInputError, match="does not exist"):
        AgentConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text('{"max_tool_calls": -1}')
    with pytest.raises(EchoInputError, match=r"bad.json.*max_tool_calls"):
        AgentConfig.load(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("organs: breast\n")
    with pytest.raises(EchoInputError, match="organs"):
        AgentConfig.load(typo)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(EchoInputError, match="broken.json"):
        AgentConfig.load(broken)
    with pytest.raises(EchoInputError, match="package.module:factory"):
        AgentConfig.load({"toolkit": "no_colon"})
    with pytest.raises(EchoInputError, match="fusion_params only apply"):
        AgentConfig.load({"fusion": "heuristic", "fusion_params": {"breast": "x.json"}})
    with pytest.raises(EchoInputError, match="max_tool_calls"):
        AgentConfig().replace(max_tool_calls=-2)


def test_environment_is_read_in_one_place():
    env = {"ECHO_AGENT_LLM_BASE_URL": "http://h:8000/v1", "ECHO_AGENT_LLM_MODEL": "qwen3-vl",
           "ECHO_AGENT_TOOLKIT": "_fakes:fake_toolkit", "ECHO_AGENT_IMAGE_STORE": "/tmp/echo-images",
           "ECHO_AGENT_ORGAN": "breast", "UNRELATED": "x"}
    cfg = AgentConfig.from_env(env, max_tool_calls=4)
    assert cfg.reasoner == EndpointReasoner(base_url="http://h:8000/v1", model="qwen3-vl")
    assert (cfg.toolkit, str(cfg.image_store), cfg.organ, cfg.max_tool_calls) == (
        "_fakes:fake_toolkit", "/tmp/echo-images", "breast", 4)
    assert set(ENV_VARS) >= {k for k in env if k.startswith("ECHO_AGENT_")}
    assert AgentConfig.from_env({}) == AgentConfig()
    with pytest.raises(EchoInputError, match="ECHO_AGENT_LLM_MODEL"):
        AgentConfig.from_env({"ECHO_AGENT_LLM_BASE_URL": "http://h:8000/v1"})


def test_parts_follow_the_config(tmp_path):
    from echo_agent.detectors import get_detector

    det_path = get_organ("breast").resolve_weights().parent / "breast.onnx"  # the previous breast detector
    cfg = AgentConfig(fusion="heuristic", detectors={"breast": det_path}, classifiers={"kidney": None},
                      router=False, toolkit="_fakes:fake_toolkit")
    store = ImageStore()
    parts = cfg.build_parts(store=store)
    assert parts.toolkit.get_store() is store
    assert parts.toolkit.detectors["breast"] is not get_detector("breast")
    assert parts.toolkit.detectors["breast"].path == det_path
    assert not parts.toolkit.has_classifier(get_organ("kidney"))
    assert isinstance(parts.fusion, HeuristicFusion) and parts.router is None and parts.reasoner is None
    assert isinstance(AgentConfig().build_parts().fusion, LearnedFusion)
    with pytest.raises(EchoInputError, match="detector weights for breast"):
        AgentConfig(detectors={"breast": tmp_path / "none.onnx"}).build_parts()
    with pytest.raises(EchoInputError, match="could not be loaded"):
        AgentConfig(toolkit="no_such_module:factory").build_parts()


def test_fusion_parameters_for_another_organ_are_refused(tmp_path):
    from echo_agent.fusion import load_fusion_params

    kidney = load_fusion_params("kidney")
    wrong = tmp_path / "kidney_as_breast.json"
    wrong.write_text(kidney.to_json())
    with pytest.raises(EchoInputError, match="for organ 'kidney', not 'breast'"):
        AgentConfig(fusion_params={"breast": wrong}).build_parts()
    fusion = AgentConfig(fusion_params={"kidney": wrong}).build_parts().fusion
    assert fusion.params_for("kidney").temperature == kidney.temperature
    assert fusion.params_for("breast") == load_fusion_params("breast")  # the other organs keep theirs


def test_runtime_resources_go_beside_the_config():
    tk = fake_toolkit()
    agent = EchoAgent.from_config(AgentConfig(review=True), toolkit=tk, checkpointer=None)
    assert agent.toolkit is tk and agent.review and agent.checkpointer is not None  # review makes one
    with pytest.raises(EchoInputError, match="not both"):
        EchoAgent.from_config(toolkit=tk, store=ImageStore())
    with pytest.raises(TypeError, match="fusion"):
        EchoAgent.from_config(fusion=HeuristicFusion())


def test_a_config_factory_pickles_for_process_and_ray_workers():
    cfg = AgentConfig(organ="breast", toolkit="_fakes:fake_toolkit", router=False)
    factory: AgentFactory = functools.partial(EchoAgent.from_config, cfg)
    agent = pickle.loads(pickle.dumps(factory))()
    assert agent.config == cfg and agent.organ == "breast"


def test_every_entry_point_builds_its_default_agent_from_a_config(tmp_path):
    from echo_agent.scale.worker import EchoBatchWorker
    from echo_agent.server.app import default_agent_factory

    server_agent = default_agent_factory(checkpointer=None, store=ImageStore())
    assert server_agent.config == AgentConfig(review=True)
    worker = EchoBatchWorker(None, None, None)
    assert worker.agent.config == AgentConfig()


def test_cli_run_takes_a_config_and_flags_apply_on_top(tmp_path):
    from typer.testing import CliRunner

    from echo_agent.cli import app

    cfg = AgentConfig(organ="kidney", fusion="heuristic", max_tool_calls=2).dump(tmp_path / "agent.yaml")
    res = CliRunner().invoke(app, ["run", str(example_image("breast_malignant")), "--config", str(cfg),
                                   "--organ", "breast", "--json", "-", "--quiet"])
    assert res.exit_code == 0, res.output
    dx = json.loads(res.stdout)
    assert dx["organ"] == "breast" and dx["reasoner"].startswith("heuristic")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_tool_calls: many\n")
    res = CliRunner().invoke(app, ["run", str(example_image("breast_malignant")), "--config", str(bad)])
    assert res.exit_code != 0 and "max_tool_calls" in res.output


def test_the_example_config_loads_and_builds():
    from pathlib import Path

    cfg = AgentConfig.load(Path(__file__).resolve().parents[1] / "examples" / "agent.yaml")
    assert cfg == AgentConfig()  # it spells out the defaults
    assert EchoAgent.from_config(cfg).config == cfg
