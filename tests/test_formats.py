"""Formats in, one format inside: alpaca / sharegpt (tool turns) / column-mapped / dataset_info.json / DPO forms
convert to MiniMind records, stream JSON arrays, count what they skip, fail on one line naming FILE:LINE, and train
through train_full_sft.py and train_lora.py (via convert, and directly with --format once the scripts have it)."""
import argparse
import json
import os
import re

import pytest
import torch

from conftest import ROOT, run_script
from minimind import formats
from minimind.checkpoint import save_model
from minimind.config import ModelConfig
from minimind.data import load_dpo, load_sft
from minimind.datatools import convert_file
from minimind.errors import DataError, UsageError
from minimind.formats import Converter, Report, Skip, Spec, convert_records, iter_json, parse_map


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def conv(obj, fmt="alpaca", **kw):
    return Converter(Spec(fmt, **kw)).convert(obj, "f.jsonl:1")


def tool_call(name, **arguments):
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


# Shaped like the files users bring: alpaca (with system + history), sharegpt with a tool round trip, AdvertiseGen.
ALPACA = [{"instruction": f"Translate to French: item {i}", "input": "good morning" if i % 2 else "",
           "output": f"bonjour {i}", **({"system": "You translate.", "history": [["hi", "hello"]]} if i % 3 == 0
                                       else {})} for i in range(12)]
SHAREGPT_TOOLS = [{"conversations": [
    {"from": "human", "value": f"What is the weather in city {i}?"},
    {"from": "function_call", "value": tool_call("get_weather", city=f"city {i}")},
    {"from": "observation", "value": json.dumps({"temp": 20 + i})},
    {"from": "gpt", "value": f"It is {20 + i} degrees in city {i}."}],
    "tools": json.dumps([{"name": "get_weather", "description": "current weather",
                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])}
    for i in range(12)]
ADGEN = [{"content": f"类型#裙*颜色#红色*风格#复古 {i}", "summary": f"这款复古红裙，第{i}号，显瘦又大方。"}
         for i in range(12)]


# ---------------------------------------------------------------------------------------------------------------
# One record at a time
# ---------------------------------------------------------------------------------------------------------------
def test_alpaca_joins_instruction_and_input_after_system_and_history():
    kind, rec = conv({"instruction": "Translate", "input": "good morning", "output": "bonjour",
                      "system": "You translate.", "history": [["hi", "hello"], ["again", "yes"]]})
    assert kind == "sft"
    assert rec["conversations"] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Translate\ngood morning"}, {"role": "assistant", "content": "bonjour"}]
    _, bare = conv({"instruction": "Say hi", "input": "", "output": "hi"})   # no empty system, no dangling '\n'
    assert bare["conversations"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_columns_map_advertisegen_and_numbers_as_text():
    spec_cols = parse_map("prompt=content,response=summary", "columns")
    assert spec_cols == {"prompt": "content", "response": "summary"}
    _, rec = conv(ADGEN[0], "columns", columns=spec_cols)
    assert rec["conversations"] == [{"role": "user", "content": ADGEN[0]["content"]},
                                    {"role": "assistant", "content": ADGEN[0]["summary"]}]
    _, rec = conv({"q": "6*7?", "a": 42}, "columns", columns={"prompt": "q", "response": "a"})
    assert rec["conversations"][-1]["content"] == "42"


def test_sharegpt_tool_turns_become_tool_calls_and_tool_messages():
    kind, rec = conv(SHAREGPT_TOOLS[3], "sharegpt")
    turns = rec["conversations"]
    assert kind == "sft" and [t["role"] for t in turns] == ["system", "user", "assistant", "tool", "assistant"]
    assert turns[0]["content"] == "" and turns[0]["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "current weather",
                                          "parameters": {"type": "object",
                                                         "properties": {"city": {"type": "string"}}}}}]
    assert turns[2] == {"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function",
                                        "function": {"name": "get_weather", "arguments": {"city": "city 3"}}}]}
    assert turns[3] == {"role": "tool", "content": '{"temp": 23}'}
    assert turns[4] == {"role": "assistant", "content": "It is 23 degrees in city 3."}
    # parallel calls: a JSON list of calls in one function_call turn
    two = json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])
    _, rec = conv({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": two},
                                     {"from": "observation", "value": "r"}, {"from": "gpt", "value": "done"}]},
                  "sharegpt")
    assert [c["function"]["name"] for c in rec["conversations"][1]["tool_calls"]] == ["a", "b"]


def test_sharegpt_system_turn_tags_and_openai_messages():
    obj = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello"}]}
    _, rec = conv(obj, "sharegpt")
    assert rec["conversations"][0] == {"role": "system", "content": "Be brief."} and len(rec["conversations"]) == 3
    custom = {"msgs": [{"speaker": "u", "text": "Hi"}, {"speaker": "bot", "text": "Yo"}]}
    cols, tags = formats.split_tags(parse_map("messages=msgs,role_tag=speaker,content_tag=text,user_tag=u,"
                                              "assistant_tag=bot", "sharegpt"))
    _, rec = conv(custom, "sharegpt", columns=cols, tags=tags)
    assert rec["conversations"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    openai = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    spec = formats.detect(openai, "f:1")
    assert spec.format == "sharegpt"
    assert Converter(spec).convert(openai, "f:1")[1]["conversations"][1]["content"] == "Yo"


def test_dpo_forms_string_alpaca_ranking_sharegpt_pairs_and_trl_messages():
    want = {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}
    string_form = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    spec = formats.detect(string_form, "f:1")
    assert Converter(spec).convert(string_form, "f:1") == ("dpo", want)
    assert conv({"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"}) == ("dpo", want)
    pair = {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
            "rejected": {"from": "gpt", "value": "5"}}
    assert conv(pair, "sharegpt") == ("dpo", want)
    trl = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}
    assert Converter(formats.detect(trl, "f:1")).convert(trl, "f:1") == ("dpo", want)
    with pytest.raises(Skip, match="end with a user turn"):   # a pair's prompt must end with the user
        conv({**pair, "conversations": pair["conversations"] + [{"from": "gpt", "value": "x"}]}, "sharegpt")


def test_what_is_skipped_and_what_is_an_error():
    with pytest.raises(Skip, match="empty response"):
        conv({"instruction": "q", "output": "  "})
    with pytest.raises(Skip, match="turn order"):
        conv({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "sharegpt")
    with pytest.raises(Skip, match="not JSON"):
        conv({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get(x"},
                                {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]}, "sharegpt")
    # a missing column means the mapping is wrong: an error naming the place, the column and the fix
    with pytest.raises(DataError, match=r"^f.jsonl:1: no column 'contnt' .*--map prompt=COLUMN"):
        conv(ADGEN[0], "columns", columns={"prompt": "contnt", "response": "summary"})
    with pytest.raises(DataError, match="must be a string, got dict"):
        conv({"instruction": {"text": "a"}, "output": "b"})
    with pytest.raises(DataError, match=r"instruction\[0\] must be an object with string 'role'"):
        conv({"instruction": ["a"], "output": "b"})   # a list prompt is read as TRL messages
    with pytest.raises(DataError, match="history"):
        conv({"instruction": "a", "output": "b", "history": ["not a pair"]})
    with pytest.raises(DataError, match="cannot tell the format.*--format columns --map"):
        formats.detect(ADGEN[0], "f:1")


def test_parse_map_and_flag_errors():
    assert parse_map(" prompt = q , response=a ", "alpaca") == {"prompt": "q", "response": "a"}
    for bad, msg in [("prompt", "ROLE=COLUMN"), ("answer=a", "unknown for --format alpaca"),
                     ("images=img", "text only")]:
        with pytest.raises(UsageError, match=msg):
            parse_map(bad, "alpaca")

    def args(**kw):
        return argparse.Namespace(**{"format": "auto", "map": "", "dataset_info": None, "dataset": None,
                                     "strict": 0, "data_path": "x.jsonl", **kw})
    for a, msg in [(args(format="columns"), "needs --map"), (args(map="prompt=q"), "needs --format"),
                   (args(format="columns", map="prompt=q"), "response=COLUMN"),
                   (args(dataset="x"), "go together")]:
        with pytest.raises(UsageError, match=msg):
            formats.spec_from_args(a)


# ---------------------------------------------------------------------------------------------------------------
# Files: JSON arrays streamed, skip reports, dataset_info.json, the convert command
# ---------------------------------------------------------------------------------------------------------------
def test_json_array_streams_records_with_their_line_numbers(tmp_path):
    path = tmp_path / "alpaca.json"
    records = ALPACA + [{"instruction": "中文 ] [ } { \" 引号", "output": "好\n的"}]
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    text = path.read_text(encoding="utf-8").split("\n")
    got = list(iter_json(str(path), chunk_chars=37))   # tiny chunks: records straddle many buffer refills
    assert [r for _, r in got] == records
    for lineno, _ in got:
        assert text[lineno - 1].strip() == "{"           # each line number is where its record opens
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"broken.json:3: invalid JSON"):
        list(iter_json(str(broken), chunk_chars=8))
    cut = tmp_path / "cut.json"
    cut.write_text('[\n {"instruction": "a", "output": "b"},\n')
    with pytest.raises(DataError, match=r"cut.json:\d+: .*(not closed|invalid JSON)"):
        list(iter_json(str(cut)))


def test_report_counts_skips_with_first_line_and_strict_stops(tmp_path):
    recs = ALPACA[:3] + [{"instruction": "q", "output": ""}, {"instruction": "", "output": "a"},
                         {"instruction": "q2", "output": ""}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    report = Report(path, "alpaca")
    out = list(convert_records(path, Spec("alpaca"), "sft", report))
    assert [n for n, _ in out] == [1, 2, 3]
    assert report.read == 6 and report.converted == 3
    assert report.skipped == {"empty response": 2, "empty prompt": 1}
    assert report.first["empty response"] == f"{path}:4"
    assert "skipped 2: empty response (first at " in report.summary()
    with pytest.raises(DataError, match=rf"^{path}:4: empty response \(--strict 1"):
        list(convert_records(path, Spec("alpaca"), "sft", strict=True))
    with pytest.raises(DataError, match=rf"{path}:1: this is a sft record but dpo data is needed"):
        list(convert_records(path, Spec("alpaca"), "dpo"))


def test_dataset_info_entries(tmp_path):
    write_jsonl(tmp_path / "adgen.jsonl", ADGEN)
    write_jsonl(tmp_path / "glaive.jsonl", SHAREGPT_TOOLS)
    write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "2+2?", "chosen": "4", "rejected": "5"}])
    info = {"adgen": {"file_name": "adgen.jsonl", "columns": {"prompt": "content", "response": "summary"}},
            "glaive": {"file_name": "glaive.jsonl", "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "tools": "tools"}},
            "pairs": {"file_name": "pairs.jsonl", "ranking": True},
            "hub": {"hf_hub_url": "someone/data"}, "mm": {"file_name": "adgen.jsonl", "columns": {"images": "i"}}}
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(info))
    file, spec = formats.load_dataset_info(str(path), "adgen")
    assert file == str(tmp_path / "adgen.jsonl")   # relative to the dataset_info.json, as LLaMA-Factory reads it
    recs = [r for _, r in convert_records(file, spec, "sft")]
    assert recs[5]["conversations"][1]["content"] == ADGEN[5]["summary"]
    file, spec = formats.load_dataset_info(str(path), "glaive")
    assert [r for _, r in convert_records(file, spec)][0]["conversations"][2]["tool_calls"]
    file, spec = formats.load_dataset_info(str(path), "pairs")
    assert [r for _, r in convert_records(file, spec, "dpo")][0]["rejected"][-1]["content"] == "5"
    for name, msg in [("hub", "needs a download"), ("mm", "text only"), ("nope", "no such entry")]:
        with pytest.raises(UsageError, match=msg):
            formats.load_dataset_info(str(path), name)


def test_convert_cli_writes_jsonl_or_nothing(tmp_path):
    src = write_jsonl(tmp_path / "adgen.jsonl", ADGEN + [{"content": "x", "summary": ""}])
    out = tmp_path / "sft.jsonl"
    r = run_script("prepare_data.py", "convert", "--data_path", src, "--out_path", out, "--from", "columns",
                   "--map", "prompt=content,response=summary")
    assert r.returncode == 0, r.stderr
    assert "13 records read, 12 converted, 1 skipped" in r.stdout and f"empty response (first at {src}:13)" in r.stdout
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 12 and lines[0]["conversations"][0]["content"] == ADGEN[0]["content"]
    # a wrong column: one line, exit 2, the old output untouched and no temp file left behind
    before = out.read_bytes()
    r = run_script("prepare_data.py", "convert", "--data_path", src, "--out_path", out, "--from", "columns",
                   "--map", "prompt=text,response=summary")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {src}:1: no column 'text'")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["adgen.jsonl", "sft.jsonl"]
    # nothing convertible is an error, not an empty file
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"content": "x", "summary": ""}])
    with pytest.raises(DataError, match="no record could be converted"):
        convert_file(empty, str(tmp_path / "e.jsonl"), Spec("columns", {"prompt": "content", "response": "summary"}))
    assert not (tmp_path / "e.jsonl").exists()


def test_stats_counts_other_formats_as_what_they_convert_to(tmp_path):
    src = write_jsonl(tmp_path / "adgen.jsonl", ADGEN)
    r = run_script("prepare_data.py", "stats", "--data_path", src, "--format", "columns",
                   "--map", "prompt=content,response=summary", "--max_seq_len", 64)
    assert r.returncode == 0, r.stderr
    assert "(sft," in r.stdout and re.search(r"documents\s+12\n", r.stdout) and "supervised tokens" in r.stdout
    assert "12 records read, 12 converted, 0 skipped" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# Training on converted data: the loaders' reader hook, then the scripts
# ---------------------------------------------------------------------------------------------------------------
def format_args(data_path, fmt, mapping=""):
    p = argparse.ArgumentParser()
    p.add_argument("--data_path")
    formats.add_format_args(p)
    return p.parse_args(["--data_path", str(data_path), "--format", fmt] + (["--map", mapping] if mapping else []))


def test_record_reader_feeds_load_sft_the_same_examples_as_a_converted_file(tokenizer, tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(ALPACA, ensure_ascii=False))
    args = format_args(src, "auto")
    reader = formats.record_reader(args, "sft")
    direct, _ = load_sft(str(src), tokenizer, 128, reader=reader)
    out = tmp_path / "sft.jsonl"
    convert_file(str(src), str(out), Spec("alpaca"))
    converted, _ = load_sft(str(out), tokenizer, 128)
    assert len(direct) == 12 and [e.ids for e in direct] == [e.ids for e in converted]
    assert [e.targets for e in direct] == [e.targets for e in converted]
    # our own JSONL under --format auto keeps the plain read_jsonl path
    assert formats.record_reader(format_args(out, "auto"), "sft") is None
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i}+{i}?", "chosen": f"{2 * i}",
                                                    "rejected": f"{2 * i + 1}"} for i in range(4)])
    got, _ = load_dpo(pairs, tokenizer, 64, reader=formats.record_reader(format_args(pairs, "auto"), "dpo"))
    assert len(got) == 4
    with pytest.raises(DataError, match="dpo record but sft data is needed.*train_dpo.py"):
        load_sft(pairs, tokenizer, 64, reader=formats.record_reader(format_args(pairs, "auto"), "sft"))


@pytest.fixture(scope="module")
def tool_tokenizer(tokenizer):
    """The bundled vocabulary with minimind's Qwen3-style chat template: the one that has a place for tool calls."""
    from minimind.tokenizer import CHAT_TEMPLATE, Tokenizer
    return Tokenizer(tokenizer.tok, CHAT_TEMPLATE)


def test_converted_tool_turns_render_and_supervise_the_call(tool_tokenizer):
    _, rec = conv(SHAREGPT_TOOLS[0], "sharegpt")
    ids, mask = tool_tokenizer.render_chat(rec["conversations"])
    text = tool_tokenizer.decode(ids)
    supervised = tool_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert '"name": "get_weather"' in text and "current weather" in text and '{"temp": 20}' in text
    assert '"get_weather"' in supervised and '"city 0"' in supervised     # the model learns to make the call
    assert "It is 20 degrees" in supervised and '{"temp": 20}' not in supervised  # ... not the tool's answer


def test_errors_found_while_rendering_converted_records_name_their_line(tool_tokenizer, tmp_path):
    recs = json.loads(json.dumps(SHAREGPT_TOOLS[:3]))
    recs[2]["conversations"][1]["value"] = '{"name": "get_weather", "arguments": {"city": NaN}}'  # Python reads NaN
    path = write_jsonl(tmp_path / "nan.jsonl", recs)
    reader = formats.record_reader(format_args(path, "sharegpt"), "sft")
    with pytest.raises(DataError, match=rf"^{path}:3: .*NaN"):
        load_sft(path, tool_tokenizer, 320, reader=reader)


@pytest.fixture(scope="module")
def base_model(tool_tokenizer, tmp_path_factory):
    tokenizer = tool_tokenizer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, rope_theta=1e4)
    from minimind.model import MiniMindForCausalLM
    d = tmp_path_factory.mktemp("formats") / "base"
    save_model(MiniMindForCausalLM(cfg), tokenizer, str(d))
    return str(d)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """An alpaca JSON array, a sharegpt JSONL with tool turns, an AdvertiseGen-shaped JSONL: as users have them."""
    d = tmp_path_factory.mktemp("user-files")
    (d / "alpaca.json").write_text(json.dumps(ALPACA, ensure_ascii=False, indent=1), encoding="utf-8")
    return {"alpaca": (str(d / "alpaca.json"), ["--format", "alpaca"]),
            "sharegpt": (write_jsonl(d / "glaive.jsonl", SHAREGPT_TOOLS), ["--format", "sharegpt"]),
            "columns": (write_jsonl(d / "adgen.jsonl", ADGEN),
                        ["--format", "columns", "--map", "prompt=content,response=summary"])}


TRAIN = ["--max_seq_len", 320, "--batch_size", 2, "--max_steps", 2, "--device", "cpu", "--dtype", "float32",
         "--num_threads", 1, "--log_interval", 1]
SCRIPTS = {"train_full_sft.py": [], "train_lora.py": ["--lora_rank", 2, "--lora_targets", "q_proj"]}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_each_format_trains_via_convert(script, base_model, user_files, tool_tokenizer, tmp_path):
    """All three user files converted and concatenated: one run trains on every record of each shape."""
    out = tmp_path / "all.jsonl"
    with open(out, "wb") as f:
        for name, (path, flags) in user_files.items():
            file, spec = formats.spec_from_args(format_args(path, flags[1], flags[3] if len(flags) > 2 else ""))
            part = tmp_path / f"{name}.jsonl"
            assert convert_file(path, str(part), spec).converted == 12
            f.write(part.read_bytes())
    r = run_script(script, "--from_weight", base_model, "--data_path", out, "--out_dir", tmp_path / "out",
                   *SCRIPTS[script], *TRAIN, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(load_sft(str(out), tool_tokenizer, 320)[0]) == 36         # every record of each shape is usable
    losses = [json.loads(x).get("loss") for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in losses if x is not None] and all(x == x and x > 0 for x in losses if x is not None)


def _wired(script: str) -> bool:
    """Has the script the --format flags yet (in its own source, or through the shared flags module)?"""
    text = (ROOT / script).read_text() + (ROOT / "minimind" / "flags.py").read_text()
    return "add_format_args" in text or "--format" in text


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "columns"])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_each_format_trains_directly_with_format_flag(script, fmt, base_model, user_files, tmp_path):
    if not _wired(script):
        pytest.skip(f"{script} does not take --format yet (formats.add_format_args + record_reader, see "
                    f"docs/en/data_formats.md)")
    path, flags = user_files[fmt]
    r = run_script(script, "--from_weight", base_model, "--data_path", path, *flags, "--out_dir", tmp_path / "out",
                   *SCRIPTS[script], *TRAIN, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "12 records read, 12 converted, 0 skipped" in r.stdout + r.stderr
    assert (tmp_path / "out" / "metrics.jsonl").is_file()
    if fmt != "columns":
        return  # the error path once per script is enough: each run costs seconds
    bad = run_script(script, "--from_weight", base_model, "--data_path", path, "--format", "columns", "--map",
                     "prompt=nope,response=summary", "--out_dir", tmp_path / "bad", *SCRIPTS[script], *TRAIN)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(f"error: {path}:")


DPO_STRING = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": f"Maybe {2 * i + 1}?"}
              for i in range(8)]
DPO_SHAREGPT = [{"conversations": [{"from": "human", "value": f"Name a colour, {i}."}],
                 "chosen": {"from": "gpt", "value": "Blue."}, "rejected": {"from": "gpt", "value": "No."}}
                for i in range(8)]
DPO_TRAIN = ["--max_seq_len", 64, "--batch_size", 2, "--max_steps", 2, "--device", "cpu", "--dtype", "float32",
             "--num_threads", 1, "--log_interval", 1]


def test_dpo_forms_train_via_convert(base_model, tool_tokenizer, tmp_path):
    out = tmp_path / "pairs.jsonl"
    with open(out, "wb") as f:
        for name, recs in [("string", DPO_STRING), ("sharegpt", DPO_SHAREGPT)]:
            src = write_jsonl(tmp_path / f"{name}.jsonl", recs)
            part = tmp_path / f"{name}.dpo.jsonl"
            assert convert_file(src, str(part), Spec("auto"), "dpo").converted == 8
            f.write(part.read_bytes())
    assert len(load_dpo(str(out), tool_tokenizer, 64)[0]) == 16
    r = run_script("train_dpo.py", "--from_weight", base_model, "--data_path", out, "--out_dir", tmp_path / "out",
                   *DPO_TRAIN, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "metrics.jsonl").is_file()


def test_dpo_string_form_trains_directly_with_format_flag(base_model, tmp_path):
    if not _wired("train_dpo.py"):
        pytest.skip("train_dpo.py does not take --format yet (formats.add_format_args + record_reader)")
    src = write_jsonl(tmp_path / "pairs.jsonl", DPO_STRING)
    r = run_script("train_dpo.py", "--from_weight", base_model, "--data_path", src, "--out_dir", tmp_path / "out",
                   *DPO_TRAIN, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8 records read, 8 converted, 0 skipped" in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Real data: the shared alpaca-GPT4 demo, rebuilt in alpaca shape, converts back to exactly what we ship
# ---------------------------------------------------------------------------------------------------------------
def test_shared_alpaca_round_trip(shared_data, tmp_path):
    src = shared_data / "sft" / "nc" / "zh_alpaca_gpt4_demo.train.jsonl"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    ours = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()[:300]]
    alpaca = [{"instruction": r["conversations"][0]["content"], "input": "", "output": r["conversations"][1]["content"]}
              for r in ours if [m["role"] for m in r["conversations"]] == ["user", "assistant"]]
    assert len(alpaca) > 250
    path = tmp_path / "alpaca_zh.json"
    path.write_text(json.dumps(alpaca, ensure_ascii=False, indent=2), encoding="utf-8")
    report = Report(str(path), "alpaca")
    back = [r for _, r in convert_records(str(path), Spec("auto"), "sft", report)]
    want = [r for r in ours if [m["role"] for m in r["conversations"]] == ["user", "assistant"]]
    assert report.converted == len(alpaca) and back == [{"conversations": r["conversations"]} for r in want]
