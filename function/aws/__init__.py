"""AWS Lambda: the handler factory (`build_handler`), direct payloads as a Mangum custom handler,
the time budget and payload limit, and API keys from Secrets Manager. The entry point Lambda
runs is `function.handler.handler`."""
