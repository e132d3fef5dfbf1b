"""The OpenAI-compatible server, over real HTTP on a loopback port: the official openai client (stream and not),
32 concurrent streams, bad requests, client disconnects, and the web page in headless Chromium."""
import asyncio
import contextlib
import http.client
import json
import shutil
import socket
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from minimind.config import ModelConfig  # noqa: E402
from minimind.generate import generate  # noqa: E402
from minimind.model import MiniMindForCausalLM  # noqa: E402
from minimind.serve import create_app  # noqa: E402


CONTEXT = 160


def request(url: str, method: str = "GET", body=None, stream: bool = False):
    """Plain stdlib HTTP (no client library between the test and the wire): (status, parsed JSON or response)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, u.path, body=data, headers={"Content-Type": "application/json"} if data else {})
    resp = conn.getresponse()
    if stream:
        return resp.status, resp, conn
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def server(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    # float64: batched and single-request sums agree to ~1e-15, so greedy replies must match exactly
    model = MiniMindForCausalLM(cfg).double().eval()
    app = create_app(model, tokenizer, "tiny", max_batch_size=8, max_seq_len=CONTEXT, default_temperature=0.0)
    with serving(app) as url:
        yield SimpleNamespace(url=url, app=app, model=model, tokenizer=tokenizer, sched=app.state.scheduler)


@contextlib.contextmanager
def serving(app):
    """Run the app under uvicorn on a free loopback port in a thread; yield its base URL; stop it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))                         # a free loopback port, held until uvicorn takes it
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def reference(server, messages, max_tokens):
    """Greedy reply computed directly (no server, batch of one): (text, completion token count, prompt length)."""
    tok = server.tokenizer
    prompt, _ = tok.render_chat(messages, add_generation_prompt=True)
    max_tokens = min(max_tokens, CONTEXT - len(prompt))
    (ids,), (reason,) = generate(server.model, [prompt], max_new_tokens=max_tokens,
                                 stop_ids=(tok.eos_id, tok.pad_id), return_finish_reasons=True)
    return tok.decode(ids), len(ids), len(prompt), reason


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny"]
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "你好！What is 2+2?"}]
    text, n, plen, reason = reference(server, msgs, 24)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (plen, n, plen + n)

    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 1            # really streamed, not one blob
    assert finish == reason and usage.completion_tokens == n

    # stop strings: the reply is cut before the first match
    if len(text) > 6:
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0,
                                           stop=[text[4:6]])
        assert r.choices[0].message.content == text[:text.index(text[4:6])]
        assert r.choices[0].finish_reason == "stop"
    # seeded sampling is reproducible across requests
    kw = dict(model="tiny", messages=msgs, max_tokens=12, temperature=1.0, seed=123)
    assert (client.chat.completions.create(**kw).choices[0].message.content
            == client.chat.completions.create(**kw).choices[0].message.content)


def test_raw_sse_format(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "stream": True}
    status, resp, conn = request(server.url + "/v1/chat/completions", "POST", body, stream=True)
    assert status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    lines = [line.decode().rstrip("\n") for line in resp if line.strip()]
    conn.close()
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_32_concurrent_streams(server):
    openai = pytest.importorskip("openai")
    prompts = [[{"role": "user", "content": f"Question {i}: " + "tell me more " * (i % 7)}] for i in range(32)]
    max_tokens = [6 + (i * 5) % 23 for i in range(32)]
    want = [reference(server, p, m)[0] for p, m in zip(prompts, max_tokens)]

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        async def one(p, m):
            stream = await client.chat.completions.create(model="tiny", messages=p, max_tokens=m, temperature=0,
                                                          stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        try:
            return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, max_tokens)))
        finally:
            await client.close()

    got = asyncio.run(run())
    assert got == want                      # 8 slots, 32 clients: queued, batched, none corrupted
    assert server.sched.stats()["running"] == 0


BAD = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", None),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "content"),
    (json.dumps({"messages": "hello"}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}).encode(), "top_p"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}).encode(), "stream"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": 3}).encode(), "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), "n=1"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}).encode(), "seed"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_k": 10**20}).encode(), "top_k"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), "content"),
]


def test_bad_requests_are_4xx_with_openai_errors(server):
    url = server.url + "/v1/chat/completions"
    for body, needle in BAD:
        status, reply = request(url, "POST", body)
        assert status == 400, (body, status, reply)
        err = reply["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
        if needle:
            assert needle in err["message"] or needle == err.get("param"), (body, err)
    # a prompt longer than the context
    status, reply = request(url, "POST", {"messages": [{"role": "user", "content": "word " * (CONTEXT * 2)}]})
    assert status == 400
    assert reply["error"]["code"] == "context_length_exceeded"
    assert str(CONTEXT) in reply["error"]["message"]
    # unknown routes and methods: 4xx too
    assert request(server.url + "/v1/nothing")[0] == 404
    assert request(url)[0] == 405
    assert request(server.url + "/v1/models/other")[0] == 404
    # unknown extra fields are ignored; the server still works after all this
    status, reply = request(url, "POST", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                          "temperature": 0, "logit_bias": {}, "user": "me"})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 3


def test_client_disconnect_frees_the_slot(server):
    sched = server.sched
    sched.step_hook = lambda: time.sleep(0.02)      # 140 steps would take ~3 s: long enough to leave mid-stream
    try:
        body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 140, "temperature": 0,
                "stream": True}
        status, resp, conn = request(server.url + "/v1/chat/completions", "POST", body, stream=True)
        assert status == 200
        seen = 0
        for line in resp:
            seen += line.startswith(b"data: ")
            if seen >= 3:
                break
        assert sched.stats()["running"] == 1
        conn.close()                               # the client goes away mid-reply
        resp.close()
        t0 = time.time()
        while sched.stats()["running"] and time.time() - t0 < 5:
            time.sleep(0.02)
        assert sched.stats()["running"] == 0
        assert time.time() - t0 < 2.0           # freed long before the 140 tokens would have been made
    finally:
        sched.step_hook = None
    status, reply = request(server.url + "/v1/chat/completions", "POST",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def _browser():
    """(chromium, chromedriver) paths, or a reason to skip."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (pip install selenium; .ci/install_browser.sh does it)"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        return None, "chromium / chromedriver not installed (bash .ci/install_browser.sh)"
    return (chromium, driver), ""


def test_web_page_streams_a_reply(server, tmp_path):
    found, why = _browser()
    if not found:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    chromium, driver_path = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    msgs = [{"role": "user", "content": "Hello 你好"}]
    want = reference(server, msgs, 30)[0]
    server.sched.step_hook = lambda: time.sleep(0.01)   # let the page see the reply arrive in pieces
    browser = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        browser.set_page_load_timeout(30)
        browser.get(server.url + "/")
        WebDriverWait(browser, 10).until(lambda b: "tiny" in b.find_element(By.ID, "model").text)
        for field, value in (("temperature", "0"), ("max_tokens", "30")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        box = browser.find_element(By.ID, "input")
        box.send_keys("Hello 你好")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 30).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        reply = browser.find_element(By.CSS_SELECTOR, ".assistant")
        assert reply.get_attribute("textContent") == want
        assert int(reply.get_attribute("data-chunks")) > 1           # streamed in pieces
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "Hello 你好"
    finally:
        server.sched.step_hook = None
        browser.quit()


def test_serve_script_end_to_end(tmp_path, tokenizer):
    """serve_openai_api.py as a user runs it: loads a model dir, binds 127.0.0.1, answers, stops on Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    from minimind.checkpoint import save_model
    from minimind.serve import parse_args
    assert parse_args([]).host == "127.0.0.1"              # loopback unless asked otherwise
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256)
    save_model(MiniMindForCausalLM(cfg), tokenizer, str(tmp_path / "m"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    bad = subprocess.run([sys.executable, os.path.join(root, "serve_openai_api.py"), "--load_from",
                          str(tmp_path / "nope")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "nope" in bad.stderr
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, os.path.join(root, "serve_openai_api.py"), "--load_from",
                             str(tmp_path / "m"), "--port", str(port), "--max_batch_size", "2",
                             "--max_seq_len", "128"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 90
        while True:
            try:
                status, health = request(url + "/health")
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        assert status == 200 and health["slots"] == 2 and health["context"] == 128
        assert request(url + "/v1/models")[1]["data"][0]["id"] == "m"
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("GET", "/")
        page = conn.getresponse()
        assert page.status == 200 and b"/v1/chat/completions" in page.read()
        conn.close()
        status, reply = request(url + "/v1/chat/completions", "POST",
                                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert status == 200 and reply["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# Tools and thinking through the server, on a tiny model trained (in tests/test_tools.py) to call tools
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_server(tokenizer):
    from test_tools import train_tool_model
    model = train_tool_model(tokenizer)
    app = create_app(model, tokenizer, "tools", max_batch_size=4, max_seq_len=512, default_temperature=0.0)
    with serving(app) as url:
        yield SimpleNamespace(url=url, sched=app.state.scheduler)


def get_weather(city: str, temp: int) -> str:
    """The client's own tool (the server never runs tools: the client does, and sends the result back)."""
    return json.dumps({"city": city, "temp": temp})


def accumulate(stream):
    """An OpenAI stream -> (content, reasoning, tool calls by index, finish_reason, chunk count), as a client
    assembles it: tool-call fields arrive as deltas keyed by index."""
    content, reasoning, calls, finish, n = "", "", {}, None, 0
    for chunk in stream:
        n += 1
        for c in chunk.choices:
            d = c.delta
            content += d.content or ""
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "type": None, "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                slot["type"] = tc.type or slot["type"]
                if tc.function:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return content, reasoning, calls, finish, n


def test_tool_round_trip_with_the_openai_client(tool_server):
    """The model asks for get_weather; the client runs it and sends the `tool` message; the model answers from
    the tool's result (two temperatures: the answer is right only if the result was read). Then streamed."""
    openai = pytest.importorskip("openai")
    from test_tools import WEATHER
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="tools", messages=question, tools=[WEATHER], max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None                          # OpenAI: null content beside the calls
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)                     # arguments: JSON text, as OpenAI sends it
    assert args == {"city": "Paris"}
    for temp in (21, 5):
        # the assistant turn goes back exactly as the SDK returned it (content null + tool_calls)
        history = question + [choice.message.model_dump(exclude_none=True),
                              {"role": "tool", "tool_call_id": call.id, "content": get_weather(**args, temp=temp)}]
        r2 = client.chat.completions.create(model="tools", messages=history, tools=[WEATHER], max_tokens=40)
        assert r2.choices[0].finish_reason == "stop"
        assert r2.choices[0].message.content == f"It is {temp} °C in Paris."
        assert not r2.choices[0].message.tool_calls

    # streamed: the call arrives as tool_calls deltas, finish_reason "tool_calls"; the answer streams as content
    content, reasoning, calls, finish, _ = accumulate(client.chat.completions.create(
        model="tools", messages=question, tools=[WEATHER], max_tokens=40, stream=True))
    assert (content, reasoning, finish) == ("", "", "tool_calls")
    assert list(calls) == [0] and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], json.loads(calls[0]["arguments"])) == ("get_weather", {"city": "Paris"})
    history = question + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0]["id"], "type": "function",
         "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": get_weather("Paris", 21)}]
    content, _, calls, finish, n = accumulate(client.chat.completions.create(
        model="tools", messages=history, tools=[WEATHER], max_tokens=40, stream=True))
    assert (content, calls, finish) == ("It is 21 °C in Paris.", {}, "stop") and n > 3


def test_reasoning_content_and_the_thinking_switch(tool_server):
    openai = pytest.importorskip("openai")
    from test_tools import SKY
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = (SKY[1]["reasoning_content"], SKY[1]["content"])
    for extra in ({"chat_template_kwargs": {"enable_thinking": True}}, {"enable_thinking": True},
                  {"chat_template_kwargs": {"open_thinking": True}}, {"open_thinking": True}):
        r = client.chat.completions.create(model="tools", messages=[SKY[0]], max_tokens=60, extra_body=extra)
        m = r.choices[0].message
        assert (m.model_extra["reasoning_content"], m.content) == want, extra
        assert r.choices[0].finish_reason == "stop"
    content, reasoning, calls, finish, n = accumulate(client.chat.completions.create(
        model="tools", messages=[SKY[0]], max_tokens=60, stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}}))
    assert (reasoning, content, calls, finish) == (*want, {}, "stop") and n > 3
    # thinking off (our template's default): no think block in the prompt, no reasoning_content in the answer
    r = client.chat.completions.create(model="tools", messages=[SKY[0]], max_tokens=8,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    # a reasoning turn in the history goes back into the template (reasoning_content is a field it renders)
    r = client.chat.completions.create(model="tools", max_tokens=4, messages=[
        SKY[0], {"role": "assistant", "content": SKY[1]["content"], "reasoning_content": "r"},
        {"role": "user", "content": "ok"}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call_on_the_wire(tool_server):
    """The raw SSE of a streamed call: a tool_calls delta with index, id, type and the whole function, then a
    chunk with finish_reason "tool_calls", then [DONE]."""
    from test_tools import WEATHER
    body = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER],
            "max_tokens": 40, "stream": True}
    status, resp, conn = request(tool_server.url + "/v1/chat/completions", "POST", body, stream=True)
    assert status == 200
    lines = [line.decode().rstrip("\n") for line in resp if line.strip()]
    conn.close()
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1
    (tc,) = calls[0]
    assert tc["index"] == 0 and tc["type"] == "function" and tc["id"].startswith("call_")
    assert tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert not any(d.get("content") for d in deltas)       # the call's markup never leaks into the content


def test_tool_choice(tool_server):
    openai = pytest.importorskip("openai")
    from test_tools import MATH, WEATHER
    from minimind.tools import calculator
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    calc = calculator().schema()
    # a named function: the call's start is written into the prompt, the model continues with the arguments
    r = client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "What is 256 * 37?"}],
                                       tools=[calc], max_tokens=40,
                                       tool_choice={"type": "function", "function": {"name": "calculate_math"}})
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("calculate_math", {"expression": "256 * 37"})
    content, _, calls, finish, _ = accumulate(client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "What is 256 * 37?"}], tools=[calc], max_tokens=40,
        stream=True, tool_choice={"type": "function", "function": {"name": "calculate_math"}}))
    assert (content, finish, calls[0]["name"]) == ("", "tool_calls", "calculate_math")   # the prefix never leaks
    # "required": the model picks the function itself
    r = client.chat.completions.create(model="tools", messages=[MATH[0]], tools=[calc], max_tokens=40,
                                       tool_choice="required")
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["calculate_math"]
    # "none": the tools are not shown to the model, and no call is parsed
    r = client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "What is the weather "
                                       "in Paris?"}], tools=[WEATHER], tool_choice="none", max_tokens=20)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].message.content, str)
    # "auto" is the default
    r = client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "What is the weather "
                                       "in Paris?"}], tools=[WEATHER], tool_choice="auto", max_tokens=40)
    assert r.choices[0].finish_reason == "tool_calls"


TOOL_BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "'g', which is not in tools"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "enable_thinking must be true or false"),
    ({"chat_template_kwargs": {"reasoning_effort": "high"}}, "reasoning_effort not supported"),
    ({"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}, "disagree"),
    ({"enable_thinking": "on"}, "enable_thinking"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{broken"}}]}]},
     "not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}]}, "arguments"),
    ({"messages": [{"role": "user", "content": "hi", "reasoning_content": "r"}]}, "reasoning_content"),
]


def test_bad_tool_requests_are_400(tool_server):
    url = tool_server.url + "/v1/chat/completions"
    for extra, needle in TOOL_BAD:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}
        status, reply = request(url, "POST", body)
        assert status == 400, (extra, status, reply)
        err = reply["error"]
        assert err["type"] == "invalid_request_error"
        assert needle in err["message"] or needle == err.get("param"), (extra, err)
    assert tool_server.sched.stats()["running"] == 0
