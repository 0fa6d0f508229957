"""publish-model against moto: round trip with the manifest, refusals, and what it prints."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from function.__main__ import main
from function.errors import ModelLoadError
from function.weights.fetcher import ModelFetcher
from function.weights.integrity import MANIFEST_NAME
from function.weights.publish import publish_model
from tests.support.s3 import files_of


@pytest.fixture
def s3(moto_s3: Any) -> Any:
    return moto_s3


def test_publish_then_cold_start_fetch(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    out = io.StringIO()

    result = publish_model(demo_model_dir, "s3://weights/models/final_model", client=s3, out=out)

    assert result.model_path == "s3://weights/models/final_model/"
    manifest = json.loads(
        s3.get_object(Bucket="weights", Key=f"models/final_model/{MANIFEST_NAME}")["Body"].read()
    )
    assert set(manifest["files"]) == set(files_of(demo_model_dir))
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    fetched = ModelFetcher(tmp_path / "cache", s3).fetch(result.model_path)
    assert {k: v for k, v in files_of(fetched.local_dir).items() if k != MANIFEST_NAME} == files_of(
        demo_model_dir
    )
    assert "upload: 100%" in out.getvalue()


def test_a_file_tampered_after_publishing_is_refused_at_cold_start(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    result = publish_model(demo_model_dir, "s3://weights/m/", client=s3, progress=False)
    s3.put_object(
        Bucket="weights", Key="m/config.json", Body=(demo_model_dir / "config.json").read_bytes() + b" "
    )

    with pytest.raises(ModelLoadError, match="manifest"):
        ModelFetcher(tmp_path / "cache", s3).fetch(result.model_path)


def test_pickle_files_and_custom_code_are_refused(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(demo_model_dir, pickled)
    (pickled / "training_args.bin").write_bytes(b"pickle")
    custom = tmp_path / "custom"
    shutil.copytree(demo_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))

    with pytest.raises(ModelLoadError, match=r"training_args\.bin"):
        publish_model(pickled, "s3://weights/p/", client=s3, progress=False)
    with pytest.raises(ModelLoadError, match="auto_map"):
        publish_model(custom, "s3://weights/c/", client=s3, progress=False)
    with pytest.raises(ModelLoadError, match="prefix"):
        publish_model(demo_model_dir, "s3://weights", client=s3, progress=False)
    assert "Contents" not in s3.list_objects_v2(Bucket="weights")  # nothing was uploaded


def test_the_cli_prints_the_model_path(
    s3: Any, demo_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the moto client, as boto3 would build it
    monkeypatch.setattr("function.weights.publish.s3_client", lambda: s3)

    assert main(["publish-model", str(demo_model_dir), "s3://weights/cli/final_model/", "--no-progress"]) == 0
    assert "MODEL_PATH=s3://weights/cli/final_model/" in capsys.readouterr().out
    assert main(["publish-model", str(demo_model_dir), "s3://Bad_Bucket/x/"]) == 1


def test_an_adapter_directory_publishes_and_serves_from_s3(
    s3: Any, adapter_dir: Path, demo_model_dir: Path, tmp_path: Path
) -> None:
    from function.engine.engine import Engine
    from function.engine.types import SamplingParams
    from tests.support.settings import make_settings

    # GIVEN an adapter and its base, both published
    base = publish_model(demo_model_dir, "s3://weights/base/", client=s3, progress=False)
    adapter = publish_model(adapter_dir, "s3://weights/adapters/sql/", client=s3, progress=False)
    assert set(files_of(adapter_dir)) <= {
        k["Key"].removeprefix("adapters/sql/") for k in s3.list_objects_v2(Bucket="weights")["Contents"]
    }

    # WHEN the engine loads the adapter from S3 over the base from S3, and the local copies directly
    settings = make_settings(model_cache_dir=tmp_path / "cache")
    engine = Engine(settings)
    loaded, _ = engine.load(adapter.model_path, base_model_path=base.model_path)
    local = Engine(make_settings())
    local.load(str(adapter_dir))
    greedy = SamplingParams(max_new_tokens=8, temperature=0)

    # THEN both are merged the same way and answer alike
    assert loaded.adapter_merged and loaded.base_path == base.model_path
    assert engine.generate("Python", greedy).continuations == local.generate("Python", greedy).continuations


def test_a_pickled_adapter_is_refused(s3: Any, adapter_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dir, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")

    with pytest.raises(ModelLoadError, match="pickle"):
        publish_model(pickled, "s3://weights/adapters/pickled/", client=s3, progress=False)
