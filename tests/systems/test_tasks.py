import pytest

from moerm.config import ConfigError
from moerm.systems.tasks import load_tasks_file, parse_tasks, task_of_domain, tasks_to_dict


def test_parse_tasks_round_trips_and_maps_domains():
    raw = {"summ": {"domains": ["summeval", "newsroom"], "capabilities": ["coherence", "fluency"]},
           "dial": {"domains": ["topical_chat"], "capabilities": {"engagingness": "keeps the talk going"}}}
    tasks = parse_tasks(raw)
    assert [t.name for t in tasks] == ["summ", "dial"]
    assert task_of_domain(tasks) == {"summeval": "summ", "newsroom": "summ", "topical_chat": "dial"}
    assert tasks[1].capability_descriptions == {"engagingness": "keeps the talk going"}
    assert parse_tasks(tasks_to_dict(tasks)) == tasks


@pytest.mark.parametrize("raw, message", [
    ({}, "expected a mapping"),
    ({"a": {"domains": ["x"]}}, r"options.tasks.a.capabilities: expected a non-empty list"),
    ({"a": {"domains": ["x"], "capabilities": ["ok", "no way"]}}, "'no way': use letters"),
    ({"a": {"domains": ["x"], "capabilities": ["c"]}, "b": {"domains": ["x"], "capabilities": ["c"]}},
     "already in task 'a'"),
    ({"a": {"domains": ["x"], "capabilities": ["c", "c"]}}, "duplicate"),
    ({"a": {"domains": ["x"], "capabilities": ["c"], "weights": 1}}, "unknown field"),
    ({"1a": {"domains": ["x"], "capabilities": ["c"]}}, "task names"),
])
def test_bad_tasks_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_tasks(raw)


def test_shipped_task_files_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[2] / "configs" / "tasks").glob("*.yaml"))
    assert {f.name for f in files} >= {"dmoerm-paper.yaml", "aspect-domains.yaml"}
    paper = {t.name: t for t in load_tasks_file(files[[f.name for f in files].index("dmoerm-paper.yaml")])}
    assert set(paper) == {"roleplay", "chat", "subjective_qa", "objective_qa", "text_creation"}
    ours = {t.name: t for t in load_tasks_file(files[[f.name for f in files].index("aspect-domains.yaml")])}
    assert "overall" not in ours["dialogue"].capabilities
