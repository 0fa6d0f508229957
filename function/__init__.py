"""llm-function: a fine-tuned language model as an HTTPS API on AWS Lambda, or an HTTP server.

Importing the package itself is cheap (the client needs nothing else); the modules that load
models force the model hub offline when they are imported.
"""

__version__ = "0.1.0"
