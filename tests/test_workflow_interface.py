"""The Flyte workflow as people meet it before a run: `pyflyte run ... --help` explains every
input, and the module docstring draws the workflows as they are wired. No mesh needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flytekit.core.base_task import PythonTask
from flytekit.core.workflow import WorkflowBase

from workflow import pipeline, tasks

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKFLOWS = {name: value for name, value in vars(pipeline).items() if isinstance(value, WorkflowBase)}


def test_the_pipelines_people_run_are_workflows_of_the_module() -> None:
    assert {"training_pipeline", "sweep_pipeline"} <= set(WORKFLOWS)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_input_has_its_own_help_on_the_command_line(name: str) -> None:
    """Each input's help is its `:param name:` line of the workflow's docstring (built from
    workflow/inputs.py's INPUT_HELP), shown beside its
    option by the real `pyflyte run --help` (wide, so that every option is one line)."""
    inputs = list(WORKFLOWS[name].python_interface.inputs)
    descriptions = {k: v.description for k, v in WORKFLOWS[name].interface.inputs.items()}
    result = subprocess.run(
        [str(BIN / "pyflyte"), "run", "workflow/pipeline.py", name, "--help"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "1000"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {
        match.group(1): " ".join(line.split())
        for line in result.stdout.splitlines()
        if (match := re.match(r"^[│|]\s*\*?\s*--(\w+)[\s,/]", line))
    }
    assert inputs and set(inputs) <= set(rows), f"options missing from --help: {set(inputs) - set(rows)}"
    for input_name in inputs:
        text = " ".join(descriptions[input_name].split())
        # flytekit's help without a docstring line is the input's name: that explains nothing.
        assert text and text != input_name, f"{name}: no `:param {input_name}:` line in the docstring"
        assert text in rows[input_name], f"{name} --{input_name}: {rows[input_name]!r}"


NUMBERS = {"five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


def test_the_module_docstring_draws_the_workflows_as_they_are() -> None:
    doc = pipeline.__doc__ or ""
    drawn = dict(re.findall(r"^ +(\w+): +(\w+(?: -> \w+)*)$", doc, re.M))
    assert set(drawn) == set(WORKFLOWS), drawn
    for name, workflow in WORKFLOWS.items():
        nodes = [node.flyte_entity.name.rsplit(".", 1)[-1] for node in workflow.nodes]
        assert drawn[name].split(" -> ") == nodes, name
    every_task = {name for name, value in vars(tasks).items() if isinstance(value, PythonTask)}
    called = {step for line in drawn.values() for step in line.split(" -> ")} - set(WORKFLOWS)
    assert called == every_task
    count = re.search(r"\b(\w+) tasks\b", doc)
    assert count and NUMBERS[count.group(1)] == len(every_task), count
