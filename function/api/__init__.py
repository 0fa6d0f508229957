"""The HTTP API: `create_app` (in `function.api.factory`), the routers, schemas, the one error path,
middleware, auth, rate limit and observability. Knows the engine; knows nothing of AWS."""
