"""Read CloudFormation/SAM YAML (with its !Ref, !Sub, … tags) as plain data for tests, transform it as
CloudFormation does (the SAM transform), and resolve it for given parameter values."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml


class CfnLoader(yaml.SafeLoader):
    """Turns `!Tag value` into `{"Fn::Tag": value}` (`!Ref x` into `{"Ref": x}`)."""


def _tag(loader: CfnLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


CfnLoader.add_multi_constructor("!", _tag)


def load_template(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.load(path.read_text(encoding="utf-8"), Loader=CfnLoader)
    return data


# Runs in the SAM virtual environment (aws-sam-cli pins its own samtranslator and boto3): the AWS::Serverless
# transform that CloudFormation applies at deploy time, with the image URI `sam deploy` would put in.
_TRANSFORM = """
import json, sys
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

class NoManagedPolicies:
    def load(self):
        return {}

template = yaml_parse(open(sys.argv[1], encoding="utf-8").read())
for resource in template["Resources"].values():
    properties = resource.get("Properties", {})
    if resource["Type"] == "AWS::Serverless::Function" and properties.get("PackageType") == "Image":
        properties["ImageUri"] = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-function:test"
print(json.dumps(transform(template, json.loads(sys.argv[2]), NoManagedPolicies())))
"""


def sam_transform(path: Path, sam_venv: Path, parameters: dict[str, str]) -> dict[str, Any]:
    """The template after the SAM transform, as CloudFormation deploys it (conditions still unresolved)."""
    result = subprocess.run(
        [str(sam_venv / "bin" / "python"), "-c", _TRANSFORM, str(path), json.dumps(parameters)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AWS_DEFAULT_REGION": "us-east-1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    transformed: dict[str, Any] = json.loads(result.stdout)
    return transformed


_NO_VALUE = object()


class Deployment:
    """Resolves a template's parameters, conditions and rules for one set of parameter values, as
    CloudFormation would: `Fn::If` takes its branch, `Ref` to a parameter its value, `AWS::NoValue` drops
    the key or item, a resource whose `Condition` is false is left out. Other intrinsics stay as they are."""

    def __init__(self, template: dict[str, Any], parameters: dict[str, str]) -> None:
        specs = template.get("Parameters", {})
        self.template = template
        self.values = {name: str(spec["Default"]) for name, spec in specs.items() if "Default" in spec}
        self.values |= parameters
        self.conditions: dict[str, bool] = {}
        for name, expression in template.get("Conditions", {}).items():  # in order: one may name another
            self.conditions[name] = self.holds(expression)

    def holds(self, expression: Any) -> bool:
        """A condition's or a rule assertion's truth (Fn::Equals, Fn::Not, Fn::And, Fn::Or, Condition)."""
        if "Condition" in expression:
            return self.conditions[expression["Condition"]]
        [(function, arguments)] = expression.items()
        if function == "Fn::Equals":
            left, right = (str(self.resolve(argument)) for argument in arguments)
            return left == right
        if function == "Fn::Not":
            return not self.holds(arguments[0])
        if function == "Fn::And":
            return all(self.holds(argument) for argument in arguments)
        if function == "Fn::Or":
            return any(self.holds(argument) for argument in arguments)
        raise ValueError(f"unsupported condition function {function}")

    def resolve(self, node: Any) -> Any:
        if isinstance(node, list):
            return [item for item in map(self.resolve, node) if item is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if node == {"Ref": "AWS::NoValue"}:
            return _NO_VALUE
        if set(node) == {"Ref"} and node["Ref"] in self.values:
            return self.values[node["Ref"]]
        if set(node) == {"Fn::If"}:
            condition, when_true, when_false = node["Fn::If"]
            return self.resolve(when_true if self.conditions[condition] else when_false)
        resolved = {key: self.resolve(value) for key, value in node.items()}
        return {key: value for key, value in resolved.items() if value is not _NO_VALUE}

    def resources(self) -> dict[str, dict[str, Any]]:
        return {
            name: self.resolve(resource)
            for name, resource in self.template["Resources"].items()
            if "Condition" not in resource or self.conditions[resource["Condition"]]
        }

    def failed_rules(self) -> list[str]:
        """The AssertDescription of every rule assertion these values break (CloudFormation refuses them)."""
        failed = []
        for rule in self.template.get("Rules", {}).values():
            if "RuleCondition" in rule and not self.holds(rule["RuleCondition"]):
                continue
            failed += [a["AssertDescription"] for a in rule["Assertions"] if not self.holds(a["Assert"])]
        return failed
