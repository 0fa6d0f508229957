"""S3 addresses and clients: parse `s3://bucket/prefix`, build a client, name an S3 failure safely.

S3 access is boto3's own configuration (credentials chain, AWS_ENDPOINT_URL_S3).
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from function.errors import ModelLoadError

MAX_CONNECTIONS = 32
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
CLIENT_ERRORS = {
    "NoSuchBucket": "the model bucket does not exist (NoSuchBucket)",
    "AccessDenied": "access to the model's S3 prefix was denied (AccessDenied): check the function's role",
    "403": "access to the model's S3 prefix was denied (403): check the function's role",
    "NoSuchKey": "a model file disappeared from S3 while it was being fetched (NoSuchKey)",
    "404": "a model file disappeared from S3 while it was being fetched (404)",
    "InvalidAccessKeyId": "the S3 credentials are not valid (InvalidAccessKeyId)",
    "SignatureDoesNotMatch": "the S3 credentials are not valid (SignatureDoesNotMatch)",
}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/prefix` -> S3Location; no `..` or empty segments, a valid bucket name."""
    if not uri.startswith("s3://"):
        raise ModelLoadError("not an s3:// URI", field="model_path")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not BUCKET_NAME.match(bucket):
        raise ModelLoadError("the S3 bucket name is not valid", field="model_path")
    segments = [segment for segment in key.split("/") if segment]
    if any(segment in (".", "..") for segment in segments) or "//" in key or key.startswith("/"):
        raise ModelLoadError("the S3 prefix must not contain '.', '..' or empty segments", field="model_path")
    return S3Location(bucket=bucket, prefix="/".join(segments) + "/" if segments else "")


_clients: weakref.WeakSet[Any] = weakref.WeakSet()  # every client s3_client built, while it lives
_clients_lock = threading.Lock()


def close_clients() -> int:
    """Close the connection pools of every S3 client built here (before a SnapStart snapshot: a restored
    environment must not inherit connections that are dead by then); returns how many. A closed client
    still works: it opens new connections when used again."""
    with _clients_lock:
        clients = list(_clients)
        _clients.clear()
    for client in clients:
        client.close()
    return len(clients)


def s3_client() -> Any:
    """boto3's own configuration, with retries on throttling, 5xx and connection errors."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 6, "mode": "standard"},
        max_pool_connections=MAX_CONNECTIONS,
        connect_timeout=5,
        read_timeout=30,
    )
    client = boto3.client("s3", config=config)
    with _clients_lock:
        _clients.add(client)
    return client


def describe_client_error(exc: Exception) -> str:
    """A reason safe for /health: the S3 error code, never the bucket, key or credentials."""
    code = (
        str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) if hasattr(exc, "response") else ""
    )
    if code in CLIENT_ERRORS:
        return CLIENT_ERRORS[code]
    if code:
        return f"S3 answered {code} while fetching the model"
    return f"S3 could not be reached while fetching the model ({type(exc).__name__})"


def client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
