"""OpenAI-compatible HTTP server: POST /v1/chat/completions (streaming or not), GET /v1/models, a web chat at /.

    pip install -e .[serve]
    python serve_openai_api.py --load_from out/sft                 # http://127.0.0.1:8998/

Concurrency: continuous batching. One worker thread owns the model and an Engine (minimind.generate) with
--max_batch_size slots. Requests wait in a FIFO queue and join the running batch as soon as a slot is free (their
prompts are prefilled together); a request leaves the batch the moment it finishes, hits a stop string, or its
client disconnects, and its slot goes to the next in line. Each request keeps its own sampling settings and
random stream, so a batch-mate never changes what it gets.

Tools and thinking (OpenAI's fields, read as vLLM reads them): `tools` go into the chat template's system turn;
the reply is parsed by tools.ReplyParser into `reasoning_content`, `content` and `tool_calls` (finish_reason
"tool_calls"), streamed as deltas; `tool` messages and assistant messages with `tool_calls` come back in the
history; `tool_choice` "auto" | "none" | "required" | {"type": "function", "function": {"name"}}; thinking is
switched by `chat_template_kwargs: {"enable_thinking": bool}` (or `open_thinking`, MiniMind-3's name, or either
at the top level).

Built on FastAPI + uvicorn (the optional `serve` extra); the rest of the library does not need them.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

from .checkpoint import load_model
from .errors import MiniMindError, UsageError
from .generate import Engine, SamplingParams, TextStream, quantize_int8
from .runtime import pick_device, pick_dtype
from .tokenizer import TOOL_CALL, Tokenizer
from .tools import Reply, ReplyParser, collect, prompt_opens_thinking

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the server needs the 'serve' extra ({e.name} is missing): pip install -e .[serve]") from e

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


# ---------------------------------------------------------------------------------------------------------------
# Request schema (OpenAI's fields; strict types, so a string where a number belongs is a 400, not a guess)
# ---------------------------------------------------------------------------------------------------------------
class Strict(BaseModel):
    """Every request object: strict types (a string where a number belongs is a 400, not a guess); fields we do
    not use are ignored, as OpenAI clients send many."""
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str = Field(min_length=1)
    arguments: str                       # JSON text of an object, as OpenAI sends it


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[ToolCall] | None = None      # assistant turns that called tools (content may be null)
    tool_call_id: str | None = None               # tool turns: which call this answers (the template ignores it)
    reasoning_content: str | None = None          # assistant turns: their reasoning, if the client kept it

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""   # null content (an assistant turn that only called tools) renders as ""

    def for_template(self) -> dict:
        """The message as render_chat takes it."""
        m = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [{"type": "function", "function": {"name": c.function.name,
                                                                 "arguments": c.function.arguments}}
                               for c in self.tool_calls]
        if self.reasoning_content is not None:
            m["reasoning_content"] = self.reasoning_content
        return m


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")   # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    """Fields we do not use (logprobs, user, parallel_tool_calls, ...) are ignored, as long as the JSON is an
    object."""
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)     # extension (vLLM's name)
    repetition_penalty: float | None = Field(None, gt=0)    # extension (vLLM's name)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)   # what torch.Generator accepts
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    chat_template_kwargs: dict[str, Any] | None = None     # vLLM's: {"enable_thinking": bool}
    enable_thinking: bool | None = None                    # the same switch at the top level (Qwen3's name)
    open_thinking: bool | None = None                      # ... and MiniMind-3's name

    def thinking(self) -> bool | None:
        """The thinking switch: True / False, or None for the template's default."""
        kw = self.chat_template_kwargs or {}
        unknown = sorted(set(kw) - {"enable_thinking", "open_thinking"})
        if unknown:
            raise APIError(400, f"chat_template_kwargs: {', '.join(unknown)} not supported (minimind's renderer "
                                f"takes enable_thinking / open_thinking only)", "chat_template_kwargs")
        given = [(k, v) for k, v in (("enable_thinking", self.enable_thinking), ("open_thinking", self.open_thinking),
                                     *(("chat_template_kwargs." + k, v) for k, v in kw.items())) if v is not None]
        for k, v in given:
            if not isinstance(v, bool):
                raise APIError(400, f"{k} must be true or false", k)
        if len({v for _, v in given}) > 1:
            raise APIError(400, f"thinking switches disagree: {', '.join(f'{k}={v}' for k, v in given)}",
                           "enable_thinking")
        return given[0][1] if given else None


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# ---------------------------------------------------------------------------------------------------------------
# The scheduler: one worker thread, one Engine, many requests
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    completion_tokens: int = 0
    stream: TextStream | None = None
    thinking: bool = False           # the prompt opened a think block: the reply starts with reasoning
    tools: bool = False              # parse <tool_call>s (the request had tools and tool_choice is not "none")
    prefix: str = ""                 # reply text already written in the prompt (a forced tool call's start)

    def parser(self) -> ReplyParser:
        p = ReplyParser(self.thinking, self.tools)
        p.feed(self.prefix)          # inside the forced call: nothing comes out until it closes
        return p

    def send(self, item) -> None:
        """Hand an event to the request's coroutine (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:   # the event loop is gone (server shutting down)
            self.cancelled = True


class Scheduler:
    """Continuous batching over an Engine: admit waiting jobs into free slots, decode one step, repeat."""

    def __init__(self, model, tokenizer: Tokenizer, max_batch_size: int = 16, max_seq_len: int = 2048,
                 compile: bool = False):
        self.tokenizer = tokenizer
        self.context = min(max_seq_len, model.config.max_position_embeddings)
        self.engine = Engine(model, max_batch_size, self.context, compile=compile)
        self.waiting: deque[Job] = deque()
        self.running: dict[int, Job] = {}    # slot -> job
        self.cond = threading.Condition()
        self.closed = False
        self.step_hook = None                 # tests: called before each decode step
        self.thread = threading.Thread(target=self._work, name="minimind-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        job.stream = TextStream(self.tokenizer, job.stop)
        with self.cond:
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        with self.cond:
            job.cancelled = True
            self.cond.notify()

    def stats(self) -> dict:
        with self.cond:
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "slots": self.engine.batch_size, "context": self.context}

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # --- worker thread ------------------------------------------------------------------------------------
    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self.closed and not self.waiting and not self.running:
                    self.cond.wait()
                if self.closed:
                    return
                for slot, job in list(self.running.items()):   # clients that went away free their slot now
                    if job.cancelled:
                        self.engine.release(slot)
                        del self.running[slot]
                admit = []
                free = len(self.engine.free_slots())
                while self.waiting and len(admit) < free:
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        admit.append(job)
            try:
                events = []
                if admit:
                    events = self.engine.add([j.prompt for j in admit], [j.params for j in admit])
                    with self.cond:
                        for j, e in zip(admit, events):
                            self.running[e.slot] = j
                if self.running:
                    if self.step_hook:
                        self.step_hook()
                    # rows that finished in add() are not running any more; step() only decodes busy slots
                    events += self.engine.step()
                self._deliver(events)
            except Exception as e:  # a bug or out of memory: fail the jobs in flight, keep serving
                with self.cond:
                    jobs = {id(j): j for j in [*self.running.values(), *admit]}
                    for slot in list(self.running):
                        self.engine.release(slot)
                    self.running.clear()
                for j in jobs.values():
                    j.send(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _deliver(self, events) -> None:
        for e in events:
            job = self.running.get(e.slot)
            if job is None:
                continue
            piece, reason = "", e.finish_reason
            if e.token is not None:
                job.completion_tokens += 1
                piece = job.stream.push(e.token)
                if job.stream.stopped:        # a stop string: end this reply, free the slot
                    reason = "stop"
                    if not e.finish_reason:
                        self.engine.release(e.slot)
            if reason and not job.stream.stopped:
                piece += job.stream.flush()
            if piece:
                job.send(("text", piece))
            if reason:
                with self.cond:
                    self.running.pop(e.slot, None)
                job.send(("done", reason))


# ---------------------------------------------------------------------------------------------------------------
# The HTTP app
# ---------------------------------------------------------------------------------------------------------------
def create_app(model, tokenizer: Tokenizer, model_name: str = "minimind", max_batch_size: int = 16,
               max_seq_len: int = 2048, default_temperature: float = 0.7, default_top_p: float = 1.0,
               compile: bool = False) -> FastAPI:
    """The FastAPI app serving one loaded model. app.state.scheduler is the batching worker."""
    sched = Scheduler(model, tokenizer, max_batch_size, max_seq_len, compile)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        sched.close()   # server shutting down: stop the worker thread

    app = FastAPI(title="minimind", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler = sched
    created = int(time.time())
    stops = (tokenizer.eos_id, tokenizer.pad_id)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
        elif param:
            msg = f"{param}: {msg}"
        return APIError(400, msg, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404
                        else "invalid_request_error").response()

    @app.get("/")
    async def index():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", **sched.stats()}

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "minimind",
                "max_model_len": sched.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return model_card()

    def make_job(req: ChatRequest) -> Job:
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16:
            raise APIError(400, "stop: at most 16 stop strings", "stop")
        messages = [m.for_template() for m in req.messages]
        thinking, choice = req.thinking(), req.tool_choice or "auto"
        tools = [{"type": "function", "function": {k: v for k, v in (("name", t.function.name), (
            "description", t.function.description), ("parameters", t.function.parameters)) if v is not None}}
            for t in req.tools or []]   # OpenAI's shape and field order; the schemas themselves as sent
        names = [t["function"]["name"] for t in tools]
        if choice != "auto" and choice != "none" and not tools:
            raise APIError(400, "tool_choice needs tools: give the functions in 'tools'", "tool_choice")
        prefix = ""
        # Forcing a call without constrained decoding: write the start of the call into the prompt, so the
        # model can only continue it (with thinking off: a forced call has no room for a think block first).
        # The start ends at '":', not '": ': BPE writes the space together with what follows (' {', ' "'), so a
        # prompt ending in a lone space token is a token sequence the model never saw in training.
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools "
                                    f"({', '.join(names)})", "tool_choice")
            prefix, thinking = f'{TOOL_CALL}\n{{"name": "{choice.function.name}", "arguments":', False
        elif choice == "required":
            prefix, thinking = f'{TOOL_CALL}\n{{"name":', False
        if choice == "none":
            tools = []               # the model is not told about them, and writes no call we would parse
        try:
            text = tokenizer.render_text(messages, add_generation_prompt=True, tools=tools or None,
                                         thinking=thinking)
        except MiniMindError as e:   # a message or tool the template cannot write
            raise APIError(400, str(e), "messages") from None
        prompt = tokenizer.encode(text + prefix)   # one encode of the whole text, as render_chat does
        room = sched.context - len(prompt)
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {sched.context} tokens. However, your "
                                f"messages resulted in {len(prompt)} tokens. Please reduce the length of the "
                                f"messages.", "messages", "context_length_exceeded")
        want = req.max_completion_tokens or req.max_tokens or room
        params = SamplingParams(
            max_new_tokens=min(want, room),  # more than fits the context: stop there, finish_reason 'length'
            temperature=default_temperature if req.temperature is None else req.temperature,
            top_k=req.top_k or 0, top_p=default_top_p if req.top_p is None else req.top_p,
            repetition_penalty=req.repetition_penalty or 1.0, stop_ids=stops, seed=req.seed)
        return Job(prompt, params, stop, asyncio.get_running_loop(), thinking=prompt_opens_thinking(text),
                   tools=bool(tools), prefix=prefix)

    def usage(job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": job.completion_tokens,
                "total_tokens": len(job.prompt) + job.completion_tokens}

    async def next_event(job: Job, request: Request):
        """The job's next event, or ("gone", None) once the client has disconnected (checked every second)."""
        while True:
            try:
                return await asyncio.wait_for(job.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return "gone", None

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        job = make_job(req)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        sched.submit(job)

        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        parser, calls = job.parser(), []

        def delta(d: dict) -> dict:
            """A parser delta as an OpenAI stream delta (a tool call gets its index in the reply)."""
            if "tool_call" not in d:
                return d
            calls.append(d["tool_call"])
            return {"tool_calls": [{"index": len(calls) - 1, **d["tool_call"]}]}

        def finish_reason(reason: str) -> str:
            return "tool_calls" if calls and reason == "stop" else reason

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while True:
                        # (no disconnect polling here: Starlette watches the connection while it streams and
                        # cancels this generator when the client leaves, which runs the finally below)
                        kind, value = await job.queue.get()
                        if kind == "text":
                            for d in parser.feed(value):
                                yield chunk(delta(d))
                        elif kind == "error":
                            err = {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
                            yield f"data: {json.dumps(err)}\n\n"
                            break
                        else:
                            for d in parser.finish():
                                yield chunk(delta(d))
                            yield chunk({}, finish_reason(value), **({"usage": None} if include_usage else {}))
                            if include_usage:
                                yield (f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': now, 'model': model_name, 'choices': [], 'usage': usage(job)})}\n\n")
                            break
                    yield "data: [DONE]\n\n"
                finally:  # normal end, or the client went away (the task is cancelled): free the slot
                    sched.cancel(job)

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        deltas = []
        try:
            while True:
                kind, value = await next_event(job, request)
                if kind == "text":
                    deltas += parser.feed(value)
                elif kind == "error":
                    raise APIError(500, value, kind="server_error")
                elif kind == "gone":
                    return JSONResponse({"error": {"message": "client closed the request", "type": "cancelled",
                                                   "param": None, "code": None}}, status_code=499)
                else:
                    deltas += parser.finish()
                    finish = value
                    break
        finally:
            sched.cancel(job)
        reply = collect(deltas, Reply(""))
        message = {"role": "assistant", "content": reply.content}
        if reply.reasoning is not None or parser.opened:
            message["reasoning_content"] = reply.reasoning or ""
        if reply.tool_calls:
            calls[:] = reply.tool_calls
            message["tool_calls"] = reply.tool_calls
            message["content"] = reply.content or None     # OpenAI: null content beside tool calls
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": finish_reason(finish)}],
                "usage": usage(job)}

    return app


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a model over an OpenAI-compatible HTTP API, with a web chat at /.")
    p.add_argument("--load_from", default="out/sft", help="model directory (output of a train_*.py)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1 = this machine only; "
                                                      "0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--model_name", default=None, help="id reported by /v1/models (default: the directory name)")
    p.add_argument("--max_batch_size", type=int, default=16, help="requests decoded together (KV cache slots)")
    p.add_argument("--max_seq_len", type=int, default=2048, help="context per request: prompt + reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="used when a request does not set it")
    p.add_argument("--top_p", type=float, default=1.0, help="used when a request does not set it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere) | float32 | bfloat16 | "
                                                   "float16")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 on CPU (about 3x faster decoding, slightly different outputs)")
    p.add_argument("--use_compile", action="store_true", help="CUDA: torch.compile the decode step")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.max_batch_size < 1 or args.max_seq_len < 2:
        raise UsageError("--max_batch_size must be >= 1 and --max_seq_len >= 2")
    try:
        import uvicorn
    except ImportError:
        raise UsageError("the server needs uvicorn: pip install -e .[serve]") from None
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device, training=False)
    model = load_model(args.load_from, device=device, dtype=dtype).eval()
    if args.quantize == "int8":
        if device.type != "cpu":
            raise UsageError("--quantize int8 is for CPU; on a GPU use --dtype bfloat16")
        quantize_int8(model)
    tokenizer = Tokenizer.load(args.load_from)
    name = args.model_name or os.path.basename(os.path.abspath(args.load_from))
    app = create_app(model, tokenizer, name, args.max_batch_size, args.max_seq_len, args.temperature, args.top_p,
                     args.use_compile)
    print(f"serving {args.load_from} as '{name}' on http://{args.host}:{args.port}/ "
          f"({args.max_batch_size} slots x {app.state.scheduler.context} tokens, {device}, {dtype})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
