"""Workflows, Kubernetes manifests and the systemd unit: linted, validated and checked offline."""

from __future__ import annotations

import configparser
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKFLOWS = REPO / ".github" / "workflows"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_workflows_pass_actionlint() -> None:
    result = subprocess.run(
        [str(BIN / "actionlint"), *map(str, sorted(WORKFLOWS.glob("*.yml")))],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["steps"])


def test_pull_requests_run_the_ci_script() -> None:
    ci = load_yaml(WORKFLOWS / "ci.yml")

    assert "pull_request" in ci[True]  # YAML reads the `on:` key as True
    assert any(step.get("run") == "bash .ci/run" for step in steps(ci["jobs"]["test"]))


def test_main_deploys_dev_smoke_tests_then_prod_behind_approval() -> None:
    deploy = load_yaml(WORKFLOWS / "deploy.yml")
    jobs = deploy["jobs"]
    samconfig = tomllib.loads((REPO / "samconfig.toml").read_text(encoding="utf-8"))

    assert deploy[True]["push"]["branches"] == ["main"]
    assert deploy["permissions"] == {"contents": "read", "id-token": "write"}
    assert jobs["deploy-dev"]["needs"] == "test" and jobs["deploy-prod"]["needs"] == "deploy-dev"
    assert jobs["deploy-dev"]["environment"] == "dev" and jobs["deploy-prod"]["environment"] == "prod"
    for name, config_env in (("deploy-dev", "default"), ("deploy-prod", "prod")):
        job_steps = steps(jobs[name])
        oidc = next(
            s for s in job_steps if s.get("uses", "").startswith("aws-actions/configure-aws-credentials")
        )
        assert oidc["with"]["role-to-assume"] == "${{ vars.AWS_DEPLOY_ROLE_ARN }}"
        assert "aws-access-key-id" not in oidc["with"]  # OIDC only, no long-lived keys
        assert any(f"sam deploy --config-env {config_env} " in s.get("run", "") for s in job_steps)
        assert config_env in samconfig
    smoke = next(s for s in steps(jobs["deploy-dev"]) if s.get("name", "").startswith("Smoke test"))["run"]
    stack = samconfig["default"]["deploy"]["parameters"]["stack_name"]
    assert f"--stack-name {stack}" in smoke and "${url}health" in smoke and "${url}generate" in smoke
    assert "X-API-Key: ${SMOKE_API_KEY}" in smoke


@pytest.mark.parametrize("manifest", sorted((REPO / "infra" / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_the_schemas(manifest: Path) -> None:
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_deployment_gpu_readiness_and_secret_keys() -> None:
    deployment = load_yaml(REPO / "infra" / "k8s" / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item for item in container["env"]}

    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["command"][:4] == ["python", "-m", "function", "serve"]
    assert env["API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "llm-function-keys"
    assert "value" not in env["API_KEYS"] and "value" not in env["ADMIN_API_KEYS"]
    service = load_yaml(REPO / "infra" / "k8s" / "service.yaml")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(REPO / "infra" / "systemd" / "llm-function.service")
    service = unit["Service"]

    assert service["ExecStart"].endswith("python -m function serve --host 0.0.0.0 --port 8000")
    assert service["EnvironmentFile"] == "/etc/llm-function/env"
    assert service["Restart"] == "always" and service["NoNewPrivileges"] == "true"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
