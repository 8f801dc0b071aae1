"""Conversational records (OpenAI/TRL ``messages``, ShareGPT ``conversations``, TRL prompt-completion and
preference pairs) through tokenized_inputs/get_tokenized_data.py --prompt_type chat.

The CLI's ``main`` runs in this process (``run_cli``, watching fds 1 and 2); its cache is read back and compared
with an oracle written here from plain tokenizer calls: the template's rendering of the whole conversation W,
tokenized with character offsets, and the character ranges each assistant turn occupies in W (from the
template's renderings of the conversation's prefixes). A token is trained iff its span lies inside one of those
ranges. Nothing here calls the code under test to compute an expectation.

The template families are the ones of tests/test_chat_templates.py (small byte-level BPE tokenizers trained
there), plus three written here: a Llama-3.1-style header template with tool calling, a Qwen2.5-style template
with ``tools`` / ``tool_calls`` / ``tool`` messages, and a Qwen3-style one that drops the reasoning of earlier
assistant turns (history rendered differently from the turn itself: one record per turn).
"""
import json
import os

import pytest
from transformers import AutoTokenizer

from tests.test_chat_templates import ADDED, FAMILIES, make_tokenizer
from tokenized_inputs.get_tokenized_data import main
from utils.errors import run_cli
from utils.record_io import load_records
from utils.schema import KINDS, SampleLayout
from utils.token_cache import read_token_cache

# --- templates written here ----------------------------------------------------------------------------------

LLAMA3_TOOLS = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}"
    "{%- if tools or system %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\nYou may call these functions:\\n' }}"
    "{%- for t in tools %}{{- t | tojson }}{{- '\\n' }}{%- endfor %}{%- endif %}"
    "{{- system + '<|eot_id|>' }}{%- endif %}"
    "{%- for m in rest %}"
    "{%- if m['role'] == 'assistant' and m.tool_calls is defined and m.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for c in m.tool_calls %}"
    "{{- '{\"name\": \"' + c.function.name + '\", \"parameters\": ' + c.function.arguments | tojson + '}' }}"
    "{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- elif m['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

QWEN25_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
    " 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '"
    " '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": '"
    " '<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# Qwen3-style: the reasoning of an assistant turn is rendered only after the last user message; earlier turns
# lose their <think> block, so the history renders differently from the turn itself.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{%- set content = m['content'] %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CHATML_SPECIAL = ["<|im_start|>", "<|im_end|>"]
# name: (template, special tokens, bos, eos, added non-special tokens)
TEMPLATES = {name: (t, s, b, e, tuple(ADDED.get(name, ()))) for name, (t, s, b, e, _) in FAMILIES.items()}
TEMPLATES.update({
    "llama3_tools": (LLAMA3_TOOLS, FAMILIES["llama3"][1], "<|begin_of_text|>", "<|end_of_text|>", ()),
    "qwen25_tools": (QWEN25_TOOLS, CHATML_SPECIAL, "<s>", "<|endoftext|>",
                     ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")),
    "qwen3_like": (QWEN3_LIKE, CHATML_SPECIAL, "<s>", "</s>", ("<think>", "</think>")),
})
CONSISTENT = [n for n in TEMPLATES if n != "qwen3_like"]  # render their history as the turns themselves
ALTERNATING = {"mistral_inst"}  # user/assistant only, no system, no tools

# --- conversations -------------------------------------------------------------------------------------------

ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
UPPER_TOOL = {"type": "function", "function": {
    "name": "upper", "description": "Upper-case a word.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_calls(*calls, content=""):
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def tool(text):
    return {"role": "tool", "content": text}


PLAIN = [  # (messages, tools): alternating user / assistant turns, 2 to 8 messages
    ([user("What is 2+2?"), assistant("4, of course.")], None),
    ([user("reverse hello"), assistant("olleh"), user("upper boi"), assistant("BOI")], None),
    ([user("add 12 34"), assistant("46"), user("sort 119849"), assistant("114899"), user("Hello, world!"),
      assistant("Hello! How are you today?"), user("two\nlines"), assistant("multi\nline answer")], None),
]
WITH_SYSTEM = [
    ([system("You are terse."), user("What is 2+2?"), assistant("4."), user("And 3+3?"), assistant("6.")], None),
    ([system("Answer in one word."), user("reverse hello"), assistant("olleh"), user("upper boi"), assistant("BOI"),
      user("Ünïcödé 🙂 text"), assistant("emoji 🙂 back")], None),
]
WITH_TOOLS = [
    ([system("You can add numbers."), user("add 12 34"), tool_calls(call("add", a=12, b=34)), tool("46"),
      assistant("12 + 34 = 46."), user("Thanks! And 2+2?"), assistant("It is 4.")], [ADD_TOOL]),
    ([user("add 1 2 and upper boi"), tool_calls(call("add", a=1, b=2), call("upper", word="boi"),
                                                content="Calling both."),
      tool("3"), tool("BOI"), assistant("1 + 2 = 3 and boi is BOI.")], [ADD_TOOL, UPPER_TOOL]),
]
REASONING = [
    ([system("Think first."), user("What is 2+2?"), assistant("<think>I add.</think>4"), user("And 3+3?"),
      assistant("<think>Add again.</think>6")], None),
    ([user("reverse hello"), assistant("<think>Backwards.</think>olleh"), user("upper boi"),
      assistant("<think>Capitals.</think>BOI"), user("sort 119849"), assistant("<think>Digits in order.</think>114899")],
     None),
]


def conversations_for(name):
    """The conversations a family's template takes."""
    if name in ALTERNATING:
        return PLAIN
    if name in ("llama3_tools", "qwen25_tools"):
        return PLAIN + WITH_SYSTEM + WITH_TOOLS
    if name in ("qwen_reasoning",):
        return PLAIN + WITH_SYSTEM + REASONING
    return PLAIN + WITH_SYSTEM


def sft_record(pid, messages, tools=None):
    record = {"prompt_id": pid, "messages": messages}
    if tools:
        record["tools"] = tools
    return record


# --- the oracle ----------------------------------------------------------------------------------------------

def render(tok, messages, tools, generation_prompt):
    return tok.apply_chat_template(messages, tools=tools or None, add_generation_prompt=generation_prompt,
                                   tokenize=False)


def encode(tok, text):
    return list(tok(text, add_special_tokens=False).input_ids)


def strip_trailing_whitespace(tok, ids):
    ids, special = list(ids), set(tok.all_special_ids)
    while ids and ids[-1] not in special and not tok.decode(ids[-1:]).strip():
        ids.pop()
    return ids


def assistant_indices(messages):
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def renders_consistently(tok, messages, tools):
    whole = render(tok, messages, tools, False)
    return all(whole.startswith(render(tok, messages[:a + 1], tools, False))
               and whole.startswith(render(tok, messages[:a], tools, True)) for a in assistant_indices(messages))


def trained_tokens(tok, messages, tools=None, last_only=False):
    """(ids of the whole conversation's rendering W, whether each is trained): a token is trained iff its
    character span lies inside an assistant turn's range [len(render(msgs[:a], True)),
    len(render(msgs[:a+1], False).rstrip()))."""
    whole = render(tok, messages, tools, False)
    enc = tok(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
    turns = assistant_indices(messages)[-1:] if last_only else assistant_indices(messages)
    ranges = [(len(render(tok, messages[:a], tools, True)), len(render(tok, messages[:a + 1], tools, False).rstrip()))
              for a in turns]
    trained = [any(lo <= s and e <= hi for lo, hi in ranges) for s, e in spans]
    for lo, hi in ranges:  # (the oracle's own sanity: every turn trains something, ending on its marker)
        assert any(lo <= s and e <= hi for s, e in spans), (whole, lo, hi)
    return ids, trained


def expected_sft(tok, pid, messages, tools=None, last_only=False):
    """The one cache record of a consistently rendered conversation, with its response_untrained ranges."""
    assert renders_consistently(tok, messages, tools), "test data: the template must render the history as is"
    ids, trained = trained_tokens(tok, messages, tools, last_only)
    first = trained.index(True)
    last = max(i for i, t in enumerate(trained) if t)
    untrained, k = [], first
    while k <= last:
        if not trained[k]:
            start = k
            while not trained[k]:
                k += 1
            untrained += [start - first, k - first]
        k += 1
    return {"prompt_id": pid, "prompt_ids": ids[:first], "response_ids": ids[first:last + 1],
            "response_untrained": untrained}


def expected_split(tok, pid, messages, tools=None):
    """One record per assistant turn: the prompt is the turn's generation prompt, the response what the turn's
    rendering adds to it (trailing whitespace dropped)."""
    out = []
    for k, a in enumerate(assistant_indices(messages), 1):
        prompt = encode(tok, render(tok, messages[:a], tools, True))
        whole = encode(tok, render(tok, messages[:a + 1], tools, False))
        assert whole[:len(prompt)] == prompt, "test data: the turn's tokens must keep its prompt's"
        out.append({"prompt_id": f"{pid}#{k}", "prompt_ids": prompt,
                    "response_ids": strip_trailing_whitespace(tok, whole[len(prompt):]), "response_untrained": []})
    return out


def expected_dpo(tok, pid, prompt, responses, tools=None):
    prompt_ids = encode(tok, render(tok, prompt, tools, True))
    out = {"prompt_id": pid, "prompt_ids": prompt_ids}
    for field, message in responses.items():
        whole = encode(tok, render(tok, prompt + [message], tools, False))
        assert whole[:len(prompt_ids)] == prompt_ids, "test data: the conversation's tokens must keep the prompt's"
        out[field + "_ids"] = strip_trailing_whitespace(tok, whole[len(prompt_ids):])
    return out


def trained_positions(record):
    """Row positions (in prompt_ids + response_ids) of the trained tokens of an expected sft record."""
    start, untrained = len(record["prompt_ids"]), record.get("response_untrained") or []
    masked = {start + j for s, e in zip(untrained[::2], untrained[1::2]) for j in range(s, e)}
    return [p for p in range(start, start + len(record["response_ids"])) if p not in masked]


# --- running the CLI -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_tokenizer(tmp_path_factory):
    """name -> (tokenizer as loaded from its save_pretrained folder, the folder), built once per module."""
    made = {}

    def get(name):
        if name not in made:
            template, special, bos, eos, added = TEMPLATES[name]
            folder = str(tmp_path_factory.mktemp(name))
            make_tokenizer(template, special, bos, eos, added).save_pretrained(folder)
            made[name] = (AutoTokenizer.from_pretrained(folder), folder)
        return made[name]
    return get


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return str(path)


def run_inprocess(argv, capfd):
    """run_cli(main, argv) in this process; (exit status, stdout, stderr)."""
    capfd.readouterr()
    try:
        run_cli(main, argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


def cli_args(model, training_type, src, dst, *extra, prompt_type="chat"):
    return ["--model", str(model), "--training_type", training_type, "--prompt_type", prompt_type, "--num_proc", "1",
            "--train_dataset_path", str(src), "--train_save_path", str(dst), *extra]


def tokenize(capfd, model, training_type, src, dst, *extra):
    code, _, err = run_inprocess(cli_args(model, training_type, src, dst, *extra), capfd)
    assert code == 0, err
    assert "Traceback" not in err
    return load_records(dst).records


def normalised(records):
    """Cache records with an absent response_untrained shown as empty (absent and empty mean the same)."""
    return [dict(r, response_untrained=list(r.get("response_untrained") or []))
            if "response_ids" in r else dict(r) for r in records]


def summary_of(dst):
    with open(str(dst) + ".meta.json") as f:
        return json.load(f)["summary"]


def check_packing(dst, expected):
    """The packed rows train exactly the oracle's tokens: one sample at a time and all samples in one row."""
    cache = read_token_cache(dst, KINDS["sft"])
    layout = SampleLayout(KINDS["sft"])
    weights = layout.loss_weights(cache)
    assert len(cache) == len(expected)
    all_ids, all_positions, offset = [], [], 0
    for i, record in enumerate(expected):
        row = record["prompt_ids"] + record["response_ids"]
        positions = trained_positions(record)
        batch = layout.pack(cache, [i])
        assert batch.input_ids[0].tolist() == row
        assert batch.target_ids.tolist() == [row[p] for p in positions], record["prompt_id"]
        assert batch.target_positions.tolist() == [p - 1 for p in positions], record["prompt_id"]
        assert int(weights[i]) == len(positions), record["prompt_id"]
        assert int(batch.response_lengths.sum()) == len(positions), record["prompt_id"]
        all_ids += [row[p] for p in positions]
        all_positions += [offset + p - 1 for p in positions]
        offset += len(row)
    batch = layout.pack(cache, list(range(len(expected))))
    assert batch.target_ids.tolist() == all_ids
    assert batch.target_positions.tolist() == all_positions
    assert int(batch.response_lengths.sum()) == len(all_ids) == int(weights.sum())


# --- SFT: one record per consistently rendered conversation --------------------------------------------------

@pytest.mark.parametrize("name", CONSISTENT)
def test_sft_conversations_match_the_oracle(name, family_tokenizer, tmp_path, capfd):
    tok, folder = family_tokenizer(name)
    conversations = conversations_for(name)
    records = [sft_record(f"c{i}", m, t) for i, (m, t) in enumerate(conversations)]
    src, dst = write_jsonl(tmp_path / "train.jsonl", records), tmp_path / "out" / "cache.jsonl"
    expected = [expected_sft(tok, f"c{i}", m, t) for i, (m, t) in enumerate(conversations)]
    got = tokenize(capfd, folder, "sft", src, dst)
    assert normalised(got) == expected
    for record, (messages, _) in zip(got, conversations):  # a single turn has no untrained range to record
        if len(assistant_indices(messages)) == 1:
            assert not record.get("response_untrained")
        else:
            assert record["response_untrained"]
    summary = summary_of(dst)
    assert (summary["records_in"], summary["records_out"]) == (len(records), len(records))
    assert summary.get("conversations_split", 0) == 0
    check_packing(dst, expected)


@pytest.mark.parametrize("name", ["chatml", "llama3_tools", "qwen25_tools", "gemma"])
def test_sft_mask_history_trains_only_the_last_turn(name, family_tokenizer, tmp_path, capfd):
    tok, folder = family_tokenizer(name)
    conversations = conversations_for(name)
    records = [sft_record(f"c{i}", m, t) for i, (m, t) in enumerate(conversations)]
    src, dst = write_jsonl(tmp_path / "train.jsonl", records), tmp_path / "out" / "cache.arrow"
    expected = [expected_sft(tok, f"c{i}", m, t, last_only=True) for i, (m, t) in enumerate(conversations)]
    assert all(not r["response_untrained"] for r in expected)
    code, _, err = run_inprocess(cli_args(folder, "sft", src, dst, "--mask_history"), capfd)
    assert code == 0, err
    cache = read_token_cache(dst, KINDS["sft"])
    assert normalised(cache.to_records()) == expected
    check_packing(dst, expected)


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "mistral_inst", "chatml_default_system",
                                  "qwen_reasoning"])
def test_single_turn_conversation_equals_the_plain_record(name, family_tokenizer, tmp_path, capfd):
    tok, folder = family_tokenizer(name)
    pairs = [("What is 2+2?", "4, of course."), ("reverse hello\n", "olleh"), ("two\nlines", "multi\nline answer"),
             ("Ünïcödé 🙂", "emoji 🙂 back"), ("think first", "<think>\nI add.\n</think>\n\n4")]
    plain = [{"prompt_id": i, "prompt": p, "response": r} for i, (p, r) in enumerate(pairs)]
    chat = [sft_record(i, [user(p), assistant(r)]) for i, (p, r) in enumerate(pairs)]
    plain_ids = tokenize(capfd, folder, "sft", write_jsonl(tmp_path / "plain.jsonl", plain), tmp_path / "p.jsonl")
    chat_ids = tokenize(capfd, folder, "sft", write_jsonl(tmp_path / "chat.jsonl", chat), tmp_path / "c.jsonl")
    assert normalised(chat_ids) == normalised(plain_ids)
    assert all(not r.get("response_untrained") for r in chat_ids)
    assert normalised(chat_ids) == [expected_sft(tok, i, [user(p), assistant(r)]) for i, (p, r) in enumerate(pairs)]


def test_sharegpt_and_prompt_completion_formats(family_tokenizer, tmp_path, capfd):
    tok, folder = family_tokenizer("qwen25_tools")
    messages, tools = WITH_TOOLS[0]
    plain_messages = WITH_SYSTEM[1][0]
    sharegpt_roles = {"system": "system", "user": "human", "assistant": "gpt"}
    records = [
        {"prompt_id": "sharegpt", "conversations": [{"from": sharegpt_roles[m["role"]], "value": m["content"]}
                                                    for m in plain_messages]},
        {"prompt_id": "prompt-completion", "prompt": messages[:2], "completion": messages[2:], "tools": tools},
        {"prompt_id": "prompt-completion-1", "prompt": plain_messages[:-1], "completion": plain_messages[-1:]},
    ]
    src, dst = write_jsonl(tmp_path / "train.jsonl", records), tmp_path / "out" / "cache.jsonl"
    expected = [expected_sft(tok, "sharegpt", plain_messages), expected_sft(tok, "prompt-completion", messages, tools),
                expected_sft(tok, "prompt-completion-1", plain_messages)]
    assert normalised(tokenize(capfd, folder, "sft", src, dst)) == expected
    check_packing(dst, expected)


def test_text_content_parts_equal_string_content(family_tokenizer, tmp_path, capfd):
    tok, folder = family_tokenizer("llama3_tools")
    messages, tools = WITH_TOOLS[0]

    def parts(text):  # split in two text parts
        return [{"type": "text", "text": text[:3]}, {"type": "text", "text": text[3:]}]
    as_parts = [dict(m, content=parts(m["content"])) if m["content"] else m for m in messages]
    src = write_jsonl(tmp_path / "train.jsonl", [sft_record("parts", as_parts, tools)])
    got = tokenize(capfd, folder, "sft", src, tmp_path / "out" / "cache.jsonl")
    assert normalised(got) == [expected_sft(tok, "parts", messages, tools)]


def test_prompt_id_from_id_or_the_records_place(family_tokenizer, tmp_path, capfd):
    _, folder = family_tokenizer("chatml")
    conversation = PLAIN[1][0]
    records = [{"prompt_id": "given", "id": "ignored", "messages": conversation}, {"id": 17, "messages": conversation},
               {"messages": conversation}, {"id": "x-4", "conversations": [{"from": "human", "value": "hi"},
                                                                           {"from": "gpt", "value": "hello"}]}]
    got = tokenize(capfd, folder, "sft", write_jsonl(tmp_path / "train.jsonl", records), tmp_path / "o" / "c.jsonl")
    assert [r["prompt_id"] for r in got] == ["given", 17, "line 3", "x-4"]


# --- SFT: a template that renders history differently is split, one record per turn --------------------------

def test_history_rendered_differently_is_split_per_turn(family_tokenizer, tmp_path, capfd):
    tok, folder = family_tokenizer("qwen3_like")
    multi, multi3 = REASONING[0][0], REASONING[1][0]
    single = [system("Think first."), user("What is 2+2?"), assistant("<think>I add.</think>4")]
    assert not renders_consistently(tok, multi, None) and not renders_consistently(tok, multi3, None)
    assert renders_consistently(tok, single, None)
    records = [sft_record("two-turns", multi), sft_record(7, multi3), sft_record("one-turn", single)]
    src, dst = write_jsonl(tmp_path / "train.jsonl", records), tmp_path / "out" / "cache.jsonl"
    expected = (expected_split(tok, "two-turns", multi) + expected_split(tok, 7, multi3)
                + [expected_sft(tok, "one-turn", single)])
    assert [r["prompt_id"] for r in expected] == ["two-turns#1", "two-turns#2", "7#1", "7#2", "7#3", "one-turn"]
    # the earlier turns' own reasoning is trained in their record, though the history drops it later
    assert "I add." not in tok.decode(expected[1]["prompt_ids"]) and "I add." in tok.decode(expected[0]["response_ids"])
    got = tokenize(capfd, folder, "sft", src, dst)
    assert normalised(got) == expected
    summary = summary_of(dst)
    assert (summary["records_in"], summary["records_out"], summary["conversations_split"]) == (3, 6, 2)
    check_packing(dst, expected)


# --- DPO -----------------------------------------------------------------------------------------------------

DPO_CASES = {  # family: (prompt messages, chosen message, rejected message, tools)
    "chatml": ([system("You are terse."), user("What is 2+2?"), assistant("4."), user("And 3+3?")],
               assistant("6."), assistant("7, I think."), None),
    "llama3_tools": ([user("add 12 34"), tool_calls(call("add", a=12, b=34)), tool("46")],
                     assistant("12 + 34 = 46."), assistant("It is 1234."), [ADD_TOOL]),
    "qwen25_tools": ([system("You can add numbers."), user("add 12 34"), tool_calls(call("add", a=12, b=34)),
                      tool("46"), assistant("46."), user("upper boi")],
                     tool_calls(call("upper", word="boi")), assistant("boi"), [ADD_TOOL, UPPER_TOOL]),
    "gemma": ([user("reverse hello"), assistant("olleh"), user("upper boi")], assistant("BOI"), assistant("Boi"), None),
    "mistral_inst": ([user("reverse hello"), assistant("olleh"), user("upper boi")],
                     assistant("BOI"), assistant("boi"), None),
}


@pytest.mark.parametrize("name", list(DPO_CASES))
def test_dpo_explicit_and_implicit_conversations(name, family_tokenizer, tmp_path, capfd):
    tok, folder = family_tokenizer(name)
    prompt, chosen, rejected, tools = DPO_CASES[name]
    explicit = {"prompt_id": "explicit", "prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    implicit = {"prompt_id": "implicit", "chosen": prompt + [chosen], "rejected": prompt + [rejected]}
    if tools:
        explicit["tools"] = implicit["tools"] = tools
    src, dst = write_jsonl(tmp_path / "train.jsonl", [explicit, implicit]), tmp_path / "out" / "cache.jsonl"
    expected = [expected_dpo(tok, pid, prompt, {"chosen": chosen, "rejected": rejected}, tools)
                for pid in ("explicit", "implicit")]
    assert tokenize(capfd, folder, "dpo", src, dst) == expected
    cache = read_token_cache(dst, KINDS["dpo"])
    assert cache.to_records() == expected


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "mistral_inst", "qwen_reasoning"])
def test_dpo_single_turn_conversation_equals_the_plain_pair(name, family_tokenizer, tmp_path, capfd):
    tok, folder = family_tokenizer(name)
    triples = [("What is 2+2?", "4, of course.", "5"), ("reverse hello\n", "olleh", "hello"),
               ("Ünïcödé 🙂", "emoji 🙂 back", "no emoji")]
    plain = [{"prompt_id": i, "prompt": p, "chosen": c, "rejected": r} for i, (p, c, r) in enumerate(triples)]
    chat = [{"prompt_id": i, "prompt": [user(p)], "chosen": [assistant(c)], "rejected": [assistant(r)]}
            for i, (p, c, r) in enumerate(triples)]
    plain_ids = tokenize(capfd, folder, "dpo", write_jsonl(tmp_path / "plain.jsonl", plain), tmp_path / "p.jsonl")
    chat_ids = tokenize(capfd, folder, "dpo", write_jsonl(tmp_path / "chat.jsonl", chat), tmp_path / "c.jsonl")
    assert chat_ids == plain_ids
    assert chat_ids == [expected_dpo(tok, i, [user(p)], {"chosen": assistant(c), "rejected": assistant(r)})
                        for i, (p, c, r) in enumerate(triples)]


# --- the real SmolLM2 tokenizer ------------------------------------------------------------------------------

def test_smollm2_conversations_sft_and_dpo(smollm2_tokenizer, tmp_path_factory, tmp_path, capfd):
    folder = str(tmp_path_factory.mktemp("smollm2_tokenizer"))
    smollm2_tokenizer.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    conversations = PLAIN[1:] + WITH_SYSTEM
    records = [sft_record(f"c{i}", m) for i, (m, _) in enumerate(conversations)]
    src, dst = write_jsonl(tmp_path / "sft.jsonl", records), tmp_path / "out" / "sft.arrow"
    expected = [expected_sft(tok, f"c{i}", m) for i, (m, _) in enumerate(conversations)]
    assert "You are a helpful AI assistant" in tok.decode(expected[0]["prompt_ids"])  # the default system turn
    code, _, err = run_inprocess(cli_args(folder, "sft", src, dst), capfd)
    assert code == 0, err
    assert normalised(read_token_cache(dst, KINDS["sft"]).to_records()) == expected
    check_packing(dst, expected)
    prompt, chosen, rejected, _ = DPO_CASES["chatml"]
    pair = {"prompt_id": "pair", "chosen": prompt + [chosen], "rejected": prompt + [rejected]}
    dpo = tokenize(capfd, folder, "dpo", write_jsonl(tmp_path / "dpo.jsonl", [pair]), tmp_path / "out" / "dpo.jsonl")
    assert dpo == [expected_dpo(tok, "pair", prompt, {"chosen": chosen, "rejected": rejected})]


# --- bad input: one line naming the file, the record and the field; exit status 2; nothing written -------------

GOOD = sft_record("ok", [user("What is 2+2?"), assistant("4.")])
CALL_OK = call("add", a=1, b=2)
BAD = {  # id: (training_type, prompt_type, the bad record (line 2), fragments of the error line)
    "unknown_role": ("sft", "chat", sft_record("b", [system("s"), user("q"), assistant("a"),
                                                     {"role": "wizard", "content": "x"}, assistant("b")]),
                     ["messages[3].role", "wizard"]),
    "missing_role": ("sft", "chat", sft_record("b", [user("q"), {"content": "a"}]), ["messages[1].role"]),
    "no_assistant": ("sft", "chat", sft_record("b", [system("s"), user("q")]), ["messages"]),
    "ends_with_user": ("sft", "chat", sft_record("b", [user("q"), assistant("a"), user("and?")]), ["messages[2]"]),
    "empty_content": ("sft", "chat", sft_record("b", [system("s"), user("  \n"), assistant("a")]),
                      ["messages[1].content"]),
    "image_part": ("sft", "chat", sft_record("b", [user([{"type": "text", "text": "look"},
                                                          {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]),
                                                    assistant("a cat")]), ["messages[0].content", "image_url"]),
    "tool_calls_not_a_list": ("sft", "chat", sft_record("b", [user("q"), {"role": "assistant", "content": "",
                                                                          "tool_calls": CALL_OK}, tool("3"),
                                                              assistant("3")]), ["messages[1].tool_calls"]),
    "tool_call_without_name": ("sft", "chat", sft_record("b", [user("q"), tool_calls(
        CALL_OK, {"type": "function", "function": {"arguments": {"a": 1}}}), tool("3"), assistant("3")]),
        ["messages[1].tool_calls"]),
    "mixed_formats": ("sft", "chat", {"prompt_id": "b", "messages": [user("q"), assistant("a")], "prompt": "q"},
                      ["messages", "prompt"]),
    "sharegpt_unknown_role": ("sft", "chat", {"prompt_id": "b", "conversations": [{"from": "human", "value": "q"},
                                                                                  {"from": "robot", "value": "a"}]},
                              ["conversations[1].from", "robot"]),
    "messages_in_completion_mode": ("sft", "completion", sft_record("b", [user("q"), assistant("a")]), ["messages"]),
    "dpo_unknown_role": ("dpo", "chat", {"prompt_id": "b", "prompt": [user("q")], "chosen": [{"role": "bot", "content": "a"}],
                                         "rejected": [assistant("c")]}, ["chosen[0].role", "bot"]),
}
GOOD_DPO = {"prompt_id": "ok", "prompt": [user("What is 2+2?")], "chosen": [assistant("4.")], "rejected": [assistant("5.")]}


@pytest.mark.parametrize("case_id", list(BAD))
def test_bad_conversation_one_line_error_and_no_output(case_id, family_tokenizer, tmp_path, capfd):
    training_type, prompt_type, bad, fragments = BAD[case_id]
    _, folder = family_tokenizer("qwen25_tools")
    good = GOOD_DPO if training_type == "dpo" else GOOD
    if prompt_type == "completion":
        good = {"prompt_id": "ok", "prompt": "What is 2+2?", "response": "4."}
    src = write_jsonl(tmp_path / "in" / "train.jsonl", [good, bad])
    out_dir = tmp_path / "out"
    code, out, err = run_inprocess(cli_args(folder, training_type, src, out_dir / "cache.jsonl",
                                            prompt_type=prompt_type), capfd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit status {code}; stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: ")
    for fragment in [src, "line 2", *fragments]:
        assert fragment in lines[0], (fragment, lines[0])
    assert "records in" not in out
    assert not out_dir.exists() or os.listdir(out_dir) == [], f"left behind: {os.listdir(out_dir)}"
