"""infra/bootstrap.yaml created in moto's CloudFormation backend: resources, settings and outputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from tests.infra.cfn import load_template

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack(aws_credentials: None) -> Iterator[dict[str, str]]:
    with mock_aws():
        cloudformation = boto3.client("cloudformation", region_name="us-east-1")
        cloudformation.create_stack(
            StackName="llm-function-bootstrap",
            TemplateBody=(REPO / "infra" / "bootstrap.yaml").read_text(),
            Parameters=[
                {"ParameterKey": "GitHubOrg", "ParameterValue": "acme"},
                {"ParameterKey": "GitHubRepo", "ParameterValue": "llm-function"},
            ],
            Capabilities=["CAPABILITY_IAM"],
        )
        described = cloudformation.describe_stacks(StackName="llm-function-bootstrap")["Stacks"][0]
        assert described["StackStatus"] == "CREATE_COMPLETE"
        yield {o["OutputKey"]: o["OutputValue"] for o in described["Outputs"]}


def test_outputs_for_samconfig_and_the_workflows(stack: dict[str, str]) -> None:
    assert set(stack) == {"WeightsBucketName", "ImageRepositoryUri", "DeployRoleArn"}
    assert ".dkr.ecr.us-east-1.amazonaws.com/" in stack["ImageRepositoryUri"]
    assert stack["DeployRoleArn"].startswith("arn:aws:iam::")


def test_the_stack_creates_its_resources(stack: dict[str, str]) -> None:
    cloudformation = boto3.client("cloudformation", region_name="us-east-1")
    created = {
        r["LogicalResourceId"]: r["ResourceStatus"]
        for r in cloudformation.list_stack_resources(StackName="llm-function-bootstrap")[
            "StackResourceSummaries"
        ]
    }
    # moto tracks the bucket, the repository and the role by name (not the policy or the OIDC provider)
    assert {"WeightsBucket", "ImageRepository", "DeployRole"} <= created.keys()
    assert set(created.values()) == {"CREATE_COMPLETE"}
    s3 = boto3.client("s3", region_name="us-east-1")
    ecr = boto3.client("ecr", region_name="us-east-1")
    iam = boto3.client("iam", region_name="us-east-1")

    s3.head_bucket(Bucket=stack["WeightsBucketName"])
    assert ecr.describe_repositories(repositoryNames=["llm-function"])["repositories"]
    role_name = stack["DeployRoleArn"].rsplit("/", 1)[1]
    assert iam.list_role_policies(RoleName=role_name)["PolicyNames"] == ["sam-deploy-llm-function"]


# moto creates the resources but does not apply every property: the settings are checked in the template.
RESOURCES = load_template(REPO / "infra" / "bootstrap.yaml")["Resources"]


def test_weights_bucket_settings() -> None:
    bucket = RESOURCES["WeightsBucket"]["Properties"]
    policy = RESOURCES["WeightsBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]

    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    encryption = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert encryption["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert (
        all(bucket["PublicAccessBlockConfiguration"].values())
        and len(bucket["PublicAccessBlockConfiguration"]) == 4
    )
    assert policy["Effect"] == "Deny" and policy["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_image_repository_settings() -> None:
    repository = RESOURCES["ImageRepository"]["Properties"]

    assert repository["ImageScanningConfiguration"] == {"ScanOnPush": True}
    assert repository["ImageTagMutability"] == "IMMUTABLE"
    assert (
        '"countType": "imageCountMoreThan"' in repository["LifecyclePolicy"]["LifecyclePolicyText"]["Fn::Sub"]
    )


def test_deploy_role_trusts_only_this_repositorys_main_and_environments() -> None:
    role = RESOURCES["DeployRole"]["Properties"]
    trust = role["AssumeRolePolicyDocument"]["Statement"]

    assert len(trust) == 1 and trust[0]["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert trust[0]["Condition"]["StringEquals"] == {
        "token.actions.githubusercontent.com:aud": "sts.amazonaws.com"
    }
    subjects = [
        s["Fn::Sub"] for s in trust[0]["Condition"]["StringLike"]["token.actions.githubusercontent.com:sub"]
    ]
    assert subjects == [
        "repo:${GitHubOrg}/${GitHubRepo}:ref:refs/heads/main",
        "repo:${GitHubOrg}/${GitHubRepo}:environment:dev",
        "repo:${GitHubOrg}/${GitHubRepo}:environment:prod",
    ]
    assert "ManagedPolicyArns" not in role  # no AdministratorAccess or other managed grants
    for grant in role["Policies"][0]["PolicyDocument"]["Statement"]:
        actions = [grant["Action"]] if isinstance(grant["Action"], str) else grant["Action"]
        assert not any(action.endswith(":*") or action == "*" for action in actions), grant["Sid"]
        if grant["Resource"] == "*":  # only actions AWS offers no resource scoping for
            assert actions in (["cloudformation:ValidateTemplate"], ["ecr:GetAuthorizationToken"]), grant[
                "Sid"
            ]
