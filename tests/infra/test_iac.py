"""Infrastructure as code, checked offline: Dockerfile, SAM template, samconfig, IAM scope."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from function.api.factory import create_app
from function.engine.engine import Engine
from tests.infra.cfn import load_template
from tests.support.local_aws import SAM_VENV, LambdaEmulator
from tests.support.settings import make_settings

CHECKOV_VENV = Path(os.environ.get("CHECKOV_VENV", Path(__file__).resolve().parents[2] / ".venv-checkov"))

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")
FUNCTION = TEMPLATE["Resources"]["LlmFunction"]["Properties"]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_a_lambda_image_with_the_emulators_handler() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")

    assert re.search(r"^FROM public\.ecr\.aws/lambda/python:3\.12 AS app\s*$", dockerfile, re.MULTILINE)
    assert dockerfile.count("\nFROM ") == 3 and re.search(
        r"^FROM app\s*$", dockerfile, re.MULTILINE
    )  # built on it
    assert dockerfile.rstrip().splitlines()[-1] == f'CMD ["{LambdaEmulator.HANDLER}"]'
    assert "ARG TORCH_VARIANT=cpu" in dockerfile and "ARG TORCH_VERSION=2.13.0" in dockerfile
    for setting in ("HF_HOME=/tmp/", "TORCH_HOME=/tmp/", "HF_HUB_OFFLINE=1", "MODEL_CACHE_DIR=/tmp/"):
        assert setting in dockerfile


def test_sam_validate_lint() -> None:
    sam = SAM_VENV / "bin" / "sam"
    result = subprocess.run(
        [str(sam), "validate", "--lint", "--template-file", str(REPO / "template.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
    )

    assert result.returncode == 0, result.stdout + result.stderr


def app_routes() -> set[tuple[str, str]]:
    """The app's routes as the Lambda handler builds it (with a request sink: no /metrics), read from its
    OpenAPI document (what clients see), plus the docs pages the document does not list."""
    app = create_app(make_settings(), Engine(make_settings()), request_sink=lambda entry: None)
    routes = {
        (method.upper(), path) for path, operations in app.openapi()["paths"].items() for method in operations
    }
    docs = {("GET", "/docs"), ("GET", "/docs/assets/{name}"), ("GET", "/redoc"), ("GET", "/openapi.json")}
    return routes | docs


def test_template_routes_match_the_apps_routes() -> None:
    events = FUNCTION["Events"].values()
    template_routes = {
        (event["Properties"]["Method"].upper(), event["Properties"]["Path"])
        for event in events
        if event["Type"] == "Api"
    }

    assert template_routes == app_routes()


def statements() -> list[dict[str, Any]]:
    """Every policy statement, the true branch of a conditional one included."""
    found: list[dict[str, Any]] = []
    for policy in FUNCTION["Policies"]:
        if isinstance(policy, dict) and "Statement" in policy:
            for statement in policy["Statement"]:
                if "Fn::If" in statement:
                    statement = statement["Fn::If"][1]
                found.append(statement)
    return found


def test_iam_grants_only_the_model_prefix() -> None:
    grants = statements()
    actions = [
        action for s in grants for action in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    ]

    assert sorted(actions) == ["s3:GetObject", "s3:ListBucket", "secretsmanager:GetSecretValue"]
    assert not any("*" in action for action in actions)
    for statement in grants:
        assert statement["Resource"] != "*"
    get = next(s for s in grants if s["Action"] == "s3:GetObject")
    # The model's prefix, and only when set, its base's and the adapters' prefixes of the same bucket.
    assert get["Resource"] == [
        {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ModelBucket}/${ModelPrefix}*"},
        {
            "Fn::If": [
                "HasBaseModel",
                {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ModelBucket}/${BaseModelPrefix}*"},
                {"Ref": "AWS::NoValue"},
            ]
        },
        {
            "Fn::If": [
                "HasAdapters",
                {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ModelBucket}/${AdaptersPrefix}*"},
                {"Ref": "AWS::NoValue"},
            ]
        },
    ]
    listing = next(s for s in grants if s["Action"] == "s3:ListBucket")
    assert listing["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ModelBucket}"}
    assert listing["Condition"] == {
        "StringLike": {
            "s3:prefix": [
                {"Fn::Sub": "${ModelPrefix}*"},
                {"Fn::If": ["HasBaseModel", {"Fn::Sub": "${BaseModelPrefix}*"}, {"Ref": "AWS::NoValue"}]},
                {"Fn::If": ["HasAdapters", {"Fn::Sub": "${AdaptersPrefix}*"}, {"Ref": "AWS::NoValue"}]},
            ]
        }
    }
    secret = next(s for s in grants if s["Action"] == "secretsmanager:GetSecretValue")
    assert secret["Resource"] == {"Ref": "ApiKeysSecretArn"}
    # Only SAM policy documents: no managed policy templates that could be wider.
    assert all(isinstance(policy, dict) and "Statement" in policy for policy in FUNCTION["Policies"])


def test_model_path_is_built_from_the_same_bucket_and_prefix() -> None:
    assert FUNCTION["Environment"]["Variables"]["MODEL_PATH"] == {
        "Fn::Sub": "s3://${ModelBucket}/${ModelPrefix}"
    }


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("", True),
        ("sql=s3://weights/adapters/sql/", True),
        ("sql=s3://weights/adapters/sql/,chat-v2=s3://weights/adapters/chat/", True),
        ("bad name=s3://weights/a/", False),
        ("sql=/local/dir", False),
        ("sql=s3://w/a/,", False),
    ],
)
def test_adapters_parameter_pattern(value: str, accepted: bool) -> None:
    assert bool(re.fullmatch(TEMPLATE["Parameters"]["Adapters"]["AllowedPattern"], value)) is accepted


@pytest.mark.parametrize("prefix", ["models/final_model/", "a/b.c/", "v1/"])
def test_model_prefix_pattern_accepts(prefix: str) -> None:
    assert re.fullmatch(TEMPLATE["Parameters"]["ModelPrefix"]["AllowedPattern"], prefix)


@pytest.mark.parametrize("prefix", ["models/../other/", "../x/", "./x/", "models", "", "/abs/", "a//b/"])
def test_model_prefix_pattern_refuses(prefix: str) -> None:
    assert not re.fullmatch(TEMPLATE["Parameters"]["ModelPrefix"]["AllowedPattern"], prefix)


def overrides(environment: dict[str, Any]) -> dict[str, str]:
    text = environment["deploy"]["parameters"]["parameter_overrides"]
    return dict(re.findall(r'(\w+)="([^"]*)"', text))


def test_samconfig_and_template_agree() -> None:
    config = tomllib.loads((REPO / "samconfig.toml").read_text(encoding="utf-8"))
    parameters = TEMPLATE["Parameters"]

    assert {"default", "prod"} <= config.keys()
    for name, environment in (("default", config["default"]), ("prod", config["prod"])):
        values = overrides(environment)
        assert values.keys() <= parameters.keys(), name
        required = {key for key, spec in parameters.items() if "Default" not in spec}
        assert required <= values.keys(), name
        for key, value in values.items():
            allowed = parameters[key].get("AllowedValues")
            assert allowed is None or value in allowed, (name, key)
            pattern = parameters[key].get("AllowedPattern")
            assert pattern is None or re.fullmatch(pattern, value), (name, key)
        stage = values["Stage"]
        assert environment["deploy"]["parameters"]["stack_name"] == f"llm-function-{stage}"
        assert environment["global"]["parameters"]["stack_name"] == f"llm-function-{stage}"
        assert environment["deploy"]["parameters"]["capabilities"] == "CAPABILITY_IAM"
    assert overrides(config["default"])["Stage"] == "dev" and overrides(config["prod"])["Stage"] == "prod"


def test_each_samconfig_environment_names_the_bootstrap_image_repository() -> None:
    # `sam deploy --config-env ENV` is one command: no --image-repository needed on the command line
    config = tomllib.loads((REPO / "samconfig.toml").read_text(encoding="utf-8"))
    bootstrap = load_template(REPO / "infra" / "bootstrap.yaml")
    repository = bootstrap["Resources"]["ImageRepository"]["Properties"]["RepositoryName"]

    for name in ("default", "prod"):
        deploy = config[name]["deploy"]["parameters"]
        uri = deploy["image_repository"]
        assert re.fullmatch(rf"\d{{12}}\.dkr\.ecr\.{deploy['region']}\.amazonaws\.com/{repository}", uri), (
            name
        )


def test_outputs_give_the_url_and_the_function_arn() -> None:
    outputs = TEMPLATE["Outputs"]

    assert "execute-api" in outputs["ApiUrl"]["Value"]["Fn::Sub"]
    assert outputs["FunctionArn"]["Value"] == {"Fn::GetAtt": "LlmFunction.Arn"}
    assert TEMPLATE["Resources"]["LlmFunction"]["Properties"]["PackageType"] == "Image"
    assert TEMPLATE["Resources"]["LlmFunction"]["Metadata"]["Dockerfile"] == "Dockerfile"


def test_checkov_passes_with_each_skip_justified() -> None:
    config = (REPO / ".checkov.yaml").read_text(encoding="utf-8")
    skips = re.findall(r"^  - (CKV_\w+)$", config, re.MULTILINE)
    for skip in skips:  # a comment block explains each skip right above it
        block = config.split(f"  - {skip}")[0].rstrip().splitlines()[-1]
        assert block.strip().startswith("#"), skip
    targets = ["-f", str(REPO / "template.yaml")]
    if (REPO / "infra").is_dir():
        targets += ["-d", str(REPO / "infra")]
    checkov = CHECKOV_VENV / "bin" / "checkov"
    result = subprocess.run(
        [str(checkov), "--config-file", str(REPO / ".checkov.yaml"), *targets],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Failed checks: 0" in result.stdout


def test_cfn_lint_passes() -> None:
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    templates = [str(REPO / "template.yaml"), *map(str, sorted((REPO / "infra").glob("*.yaml")))]
    result = subprocess.run([str(cfn_lint), *templates], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr


def test_api_gateway_throttling_and_usage_plan_are_parameters() -> None:
    api = TEMPLATE["Resources"]["Api"]["Properties"]
    plan = TEMPLATE["Resources"]["UsagePlan"]["Properties"]

    assert api["MethodSettings"][0]["ThrottlingRateLimit"] == {"Ref": "ThrottlingRateLimit"}
    assert api["MethodSettings"][0]["ThrottlingBurstLimit"] == {"Ref": "ThrottlingBurstLimit"}
    assert plan["Quota"] == {
        "Limit": {"Ref": "UsagePlanQuotaLimit"},
        "Period": {"Ref": "UsagePlanQuotaPeriod"},
    }
    assert plan["ApiStages"][0]["ApiId"] == {"Ref": "Api"}


def test_keys_come_from_a_secret_never_from_plain_text() -> None:
    variables = FUNCTION["Environment"]["Variables"]

    assert "API_KEYS" not in variables and "ADMIN_API_KEYS" not in variables
    assert variables["API_KEYS_SECRET_ARN"]["Fn::If"][1] == {"Ref": "ApiKeysSecretArn"}
    assert "NoEcho" not in TEMPLATE["Parameters"]["ApiKeysSecretArn"]  # an ARN, not a secret
    assert variables["ALLOW_RUNTIME_MODEL_LOAD"] == {"Ref": "AllowRuntimeModelLoad"}
    assert TEMPLATE["Parameters"]["AllowRuntimeModelLoad"]["Default"] == "false"
