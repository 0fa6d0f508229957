"""SnapStart in template.yaml: the SnapStart parameter, checked on the template CloudFormation deploys
(after the SAM transform) with the parameter on and off."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.infra.cfn import Deployment, load_template, sam_transform
from tests.support.local_aws import SAM_VENV

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")
REQUIRED = {"ModelBucket": "llm-function-weights-dev", "ModelPrefix": "models/final_model/"}
ALIAS = "LlmFunctionAliaslive"


@pytest.fixture(scope="module")
def transformed() -> dict[str, Any]:
    return sam_transform(REPO / "template.yaml", SAM_VENV, REQUIRED)


def deploy(transformed: dict[str, Any], **parameters: str) -> dict[str, dict[str, Any]]:
    return Deployment(transformed, REQUIRED | parameters).resources()


def of_type(resources: dict[str, dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {name: resource for name, resource in resources.items() if resource["Type"] == kind}


def test_snapstart_on_snapshots_published_versions_weights_in_memory(transformed: dict[str, Any]) -> None:
    resources = deploy(transformed, SnapStart="true", EphemeralStorageSize="4096")
    function = resources["LlmFunction"]["Properties"]

    assert function["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    # SnapStart refuses more than 512 MB of /tmp: the parameter is overridden, not passed through
    assert int(function["EphemeralStorage"]["Size"]) <= 512
    assert function["Environment"]["Variables"]["WEIGHTS_IN_MEMORY"] == "true"
    assert "AWS_LAMBDA_INITIALIZATION_TYPE" not in function["Environment"]["Variables"]  # Lambda sets it


def test_snapstart_off_is_the_on_demand_function(transformed: dict[str, Any]) -> None:
    resources = deploy(transformed, SnapStart="false", EphemeralStorageSize="4096")
    function = resources["LlmFunction"]["Properties"]

    assert function["SnapStart"] == {"ApplyOn": "None"}
    assert function["EphemeralStorage"]["Size"] == "4096"
    assert function["Environment"]["Variables"]["WEIGHTS_IN_MEMORY"] == "auto"
    assert TEMPLATE["Parameters"]["SnapStart"]["Default"] == "false"  # README, SnapStart: why
    chosen = deploy(transformed, SnapStart="false", WeightsInMemory="false")["LlmFunction"]["Properties"]
    assert chosen["Environment"]["Variables"]["WEIGHTS_IN_MEMORY"] == "false"


@pytest.mark.parametrize("snapstart", ["true", "false"])
def test_a_version_is_published_behind_the_alias(transformed: dict[str, Any], snapstart: str) -> None:
    resources = deploy(transformed, SnapStart=snapstart)
    [(version_id, version)] = of_type(resources, "AWS::Lambda::Version").items()
    [(alias_id, alias)] = of_type(resources, "AWS::Lambda::Alias").items()

    assert alias_id == ALIAS and alias["Properties"]["Name"] == "live"
    assert alias["Properties"]["FunctionVersion"] == {"Fn::GetAtt": [version_id, "Version"]}
    assert version["Properties"]["FunctionName"] == {"Ref": "LlmFunction"}
    # a superseded version is deleted: its snapshot is not kept cached (and billed) for nothing
    assert version["DeletionPolicy"] == "Delete"
    assert "ProvisionedConcurrencyConfig" not in alias["Properties"]  # SnapStart refuses it


def test_a_parameter_change_alone_publishes_no_version(transformed: dict[str, Any]) -> None:
    # SAM hashes the image URI, not parameter values (aws/serverless-application-model#3820): the README's
    # "Versions and the alias" says how to publish after such a deploy. If this fails, SAM changed: update it.
    changed = sam_transform(
        REPO / "template.yaml", SAM_VENV, REQUIRED | {"ModelPrefix": "other/", "SnapStart": "true"}
    )

    assert of_type(changed["Resources"], "AWS::Lambda::Version").keys() == (
        of_type(transformed["Resources"], "AWS::Lambda::Version").keys()
    )


@pytest.mark.parametrize("snapstart", ["true", "false"])
def test_the_api_invokes_the_alias_and_only_it(transformed: dict[str, Any], snapstart: str) -> None:
    resources = deploy(transformed, SnapStart=snapstart)
    paths = resources["Api"]["Properties"]["Body"]["paths"]
    integrations = {
        (method.upper(), path): operation["x-amazon-apigateway-integration"]
        for path, operations in paths.items()
        for method, operation in operations.items()
    }
    permissions = of_type(resources, "AWS::Lambda::Permission").values()
    routes = {
        (event["Properties"]["Method"].upper(), event["Properties"]["Path"])
        for event in TEMPLATE["Resources"]["LlmFunction"]["Properties"]["Events"].values()
    }

    assert integrations.keys() == routes
    for integration in integrations.values():
        assert integration["type"] == "aws_proxy"
        assert "/functions/${" + ALIAS + "}/invocations" in integration["uri"]["Fn::Sub"]
    assert len(permissions) == len(routes)
    granted = set()
    for permission in (p["Properties"] for p in permissions):
        assert permission["Action"] == "lambda:InvokeFunction"
        assert permission["Principal"] == "apigateway.amazonaws.com"
        assert permission["FunctionName"] == {"Ref": ALIAS}  # the alias, not the unqualified function
        arn, names = permission["SourceArn"]["Fn::Sub"]
        assert names["__ApiId__"] == {"Ref": "Api"}
        route = re.fullmatch(r".*/\$\{__Stage__\}/([A-Z]+)(/.*)", arn)
        assert route, arn
        granted.add((route[1], route[2]))
    # one grant per route (a path parameter is a single-segment wildcard in the ARN), none wider
    assert granted == {(method, re.sub(r"\{\w+\}", "*", path)) for method, path in routes}


def test_snapstart_constraints_hold(transformed: dict[str, Any]) -> None:
    function = TEMPLATE["Resources"]["LlmFunction"]["Properties"]
    kinds = {resource["Type"] for resource in transformed["Resources"].values()}

    assert "ProvisionedConcurrencyConfig" not in function and "FileSystemConfigs" not in function
    assert not any(kind.startswith("AWS::EFS::") for kind in kinds)
    assert "AWS::Lambda::EventSourceMapping" not in kinds
    # the snapshot's INIT may take max(130 s, Timeout); an invocation may take up to 900 s
    assert TEMPLATE["Parameters"]["Timeout"]["MaxValue"] <= 900


def test_snapstart_refuses_weights_on_disk() -> None:
    assert Deployment(TEMPLATE, REQUIRED | {"SnapStart": "true", "WeightsInMemory": "false"}).failed_rules()
    for snapstart, weights in (("true", "auto"), ("true", "true"), ("false", "false"), ("false", "auto")):
        values = REQUIRED | {"SnapStart": snapstart, "WeightsInMemory": weights}
        assert Deployment(TEMPLATE, values).failed_rules() == [], values


def test_outputs_name_the_alias_for_direct_invocations(transformed: dict[str, Any]) -> None:
    outputs = transformed["Outputs"]

    assert outputs["FunctionAliasArn"]["Value"] == {"Ref": ALIAS}
    assert outputs["FunctionArn"]["Value"] == {"Fn::GetAtt": ["LlmFunction", "Arn"]}


def test_the_image_can_run_snapstart_hooks() -> None:
    # The AWS Python 3.12+ base images run the snapshot_restore_py hooks (their runtime client calls
    # /restore/next); the package is a declared runtime dependency, installed into the image.
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    version = re.search(r"^FROM public\.ecr\.aws/lambda/python:3\.(\d+)", dockerfile, re.MULTILINE)
    assert version and int(version.group(1)) >= 12
    assert re.search(r"^RUN pip install --no-cache-dir \. ", dockerfile, re.MULTILINE)
    assert any(re.match(r"snapshot-restore-py\b", dependency) for dependency in project["dependencies"])
