"""gpt2-server.py's HTTP layer: an OpenAI-compatible API and a demonstration page over tasks/.

    from server.app import create_app, ServerConfig
    app = create_app(model, enc, engine, ServerConfig(model_name="gpt2ja-small"))

app.py          create_app: the routes, the error handlers, the middleware
state.py        State (what every route reads) and Channel (one request's events, deadline, disconnection)
routes/         completions, chat (completions), embeddings, tokens, page, metrics (with /health and /v1/models)
body.py         reading a POST body (JSON only, size, read timeout, nesting)
guard.py        the Host header, the API key, request metrics
responses.py    JSON responses, Server-Sent Events with a bounded write time
connections.py  uvicorn's HTTP protocol with a header read timeout
requests.py     field validation (ApiError: OpenAI's error object)
controls.py     a request's sampling controls (SamplingParams)
chat.py         the plain-text rendering of chat messages (ChatTemplate, --chat_template)

``cli/server.py`` parses the flags and runs the app with uvicorn.  docs/server-network.md: the limits.
"""
