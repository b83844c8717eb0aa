"""gpt2-server.py's HTTP layer: an OpenAI-compatible API and a demonstration page over tasks/.

    from server.app import create_app, ServerConfig
    app = create_app(model, enc, engine, ServerConfig(model_name="gpt2ja-small"))

``cli/server.py`` parses the flags and runs the app with uvicorn.
"""
