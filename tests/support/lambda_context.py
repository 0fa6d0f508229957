"""A stand-in for the Lambda runtime's context object."""

from __future__ import annotations

import time


class LambdaContext:
    """A stand-in for the runtime's context object: the fields the handler reads."""

    def __init__(self, remaining_ms: int = 60_000) -> None:
        self.deadline = time.monotonic() + remaining_ms / 1000
        self.aws_request_id = "test-request"
        self.function_name = "llm-function"
        self.memory_limit_in_mb = 3008
        self.invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:llm-function"

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)
