"""`edgeprefill serve`: an OpenAI-compatible local server (chat and text completions, streamed
or not) whose requests share one prefix cache and pick their prefill strategy.

engine: the model's worker thread, queue, prefix cache and metrics (no web framework);
protocol: OpenAI's request checks and response shapes; app: the Starlette app and uvicorn.
"""
