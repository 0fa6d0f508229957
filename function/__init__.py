"""llm-function: a fine-tuned language model as an HTTPS API on AWS Lambda, or an HTTP server."""

from function.config import enforce_hub_offline

__version__ = "0.1.0"

enforce_hub_offline()
