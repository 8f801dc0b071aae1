"""Conversational records, normalised to message lists and checked field by field.

Accepted, besides the plain ``{prompt_id, prompt, response}`` / ``{prompt_id, prompt, chosen, rejected}`` records
(strings, one user turn):

* SFT, OpenAI / TRL ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...},
  ...], "tools": [...]}`` (``tools``: optional, handed to the chat template); assistant messages may carry
  ``tool_calls`` (``[{"type": "function", "function": {"name": ..., "arguments": {...}}}]``).
* SFT, ShareGPT ``conversations``: ``[{"from": "system"|"human"|"gpt"|..., "value": ...}]`` (roles mapped as
  LLaMA-Factory maps them: human/user -> user, gpt/assistant/model -> assistant, observation/tool/function -> tool).
* SFT, TRL conversational prompt-completion: ``{"prompt": [messages], "completion": [messages]}``.
* DPO, TRL explicit conversational preference: ``{"prompt": [messages], "chosen": [assistant message],
  "rejected": [assistant message]}``; implicit: ``{"chosen": [conversation], "rejected": [conversation]}`` whose
  common leading messages are the prompt (TRL's ``extract_prompt``).

``content`` is a string or a list of text parts (``[{"type": "text", "text": ...}]``, joined); image and other
parts are refused. Every error names the field path (``messages[3].role``). The record's ``prompt_id`` is its
``prompt_id``, else its ``id``, else its place in the file (``line 7``).
"""
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool",
                  "observation": "tool", "function": "tool"}


class Conversation(dict):
    """A normalised conversational record: ``prompt_id``, ``messages`` (SFT) or ``prompt`` + one message list per
    response field (DPO), ``tools`` (None or a list)."""


def conversational_field(record):
    """The field that makes a raw record conversational (``messages`` or ``conversations``, or a message list in
    place of a text field), or None for a plain record of strings."""
    return next((f for f in ("messages", "conversations") if f in record), None) or next(
        (f for f in ("prompt", "completion", "chosen", "rejected") if isinstance(record.get(f), list)), None)


def normalise(record, kind, error):
    """The Conversation of a conversational raw record of ``kind`` (``utils.schema.Kind``); ``error(field,
    message)`` builds the DataError naming the record. Raises it for the first bad field."""
    fields = [f for f in ("messages", "conversations", "prompt", "completion", "chosen", "rejected", "response")
              if f in record]
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise error("tools", "must be a list of tool definitions (objects)")
    if not kind.paired:
        formats = [f for f in ("messages", "conversations", "prompt") if f in record]
        if len(formats) > 1:
            raise error(formats[1], f"mixes formats: {' and '.join(formats)} (give one of them)")
        if "messages" in record:
            messages = _messages(record["messages"], "messages", error)
        elif "conversations" in record:
            messages = _sharegpt(record["conversations"], error)
        else:
            extra = [f for f in fields if f not in ("prompt", "completion")]
            if extra or "completion" not in record:
                raise error(extra[0] if extra else "completion",
                            "mixes formats: a conversational prompt goes with a 'completion' message list"
                            if extra else "missing (a conversational prompt needs its completion messages)")
            messages = (_messages(record["prompt"], "prompt", error)
                        + _messages(record["completion"], "completion", error, offset=len(record["prompt"])))
        _check_sft(messages, "messages" if "messages" in record else "conversations" if "conversations" in record
                   else "completion", error)
        return Conversation(prompt_id=None, messages=messages, tools=tools)
    for field in kind.response_fields:
        if field not in record:
            raise error(field, "missing")
        if not isinstance(record[field], list):
            raise error(field, "must be a message list like the other conversational fields")
    responses = {f: _messages(record[f], f, error) for f in kind.response_fields}
    if "prompt" in record:  # explicit: each response is the final assistant message
        if not isinstance(record["prompt"], list):
            raise error("prompt", "must be a message list like the responses")
        prompt = _messages(record["prompt"], "prompt", error)
        if not prompt:
            raise error("prompt", "is empty")
    else:  # implicit: the responses are whole conversations sharing their leading messages
        first, *others = responses.values()
        common = 0
        while all(common < len(r) - 1 for r in responses.values()) and all(r[common] == first[common] for r in others):
            common += 1
        prompt = first[:common]
        if not prompt:
            raise error(kind.response_fields[0], "shares no leading messages with "
                        f"{kind.response_fields[1]}: no prompt (give a 'prompt' message list)")
        responses = {f: r[common:] for f, r in responses.items()}
    for field, response in responses.items():
        if len(response) != 1 or response[0]["role"] != "assistant":
            raise error(field, "must end the conversation with one assistant message after the prompt "
                               f"(found {len(response)} message(s) there"
                               f"{', role ' + response[0]['role'] if len(response) == 1 else ''})")
    if prompt[-1]["role"] == "assistant":
        raise error("prompt", "ends with an assistant message: the responses answer nothing")
    return Conversation(prompt_id=None, prompt=prompt, tools=tools, **responses)


def _messages(value, field, error, offset=0):
    if not isinstance(value, list):
        raise error(field, f"must be a list of messages, found {type(value).__name__}")
    return [_message(m, f"{field}[{i + offset}]", error) for i, m in enumerate(value)]


def _message(message, where, error):
    if not isinstance(message, dict):
        raise error(where, f"must be a message (an object with role and content), found {type(message).__name__}")
    role = message.get("role")
    if role is None:
        raise error(f"{where}.role", "missing")
    if role not in ROLES:
        raise error(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    out = {k: v for k, v in message.items() if k not in ("role", "content")}
    out = {"role": role, "content": _content(message.get("content"), f"{where}.content", error), **out}
    if "tool_calls" in message:
        if role != "assistant":
            raise error(f"{where}.tool_calls", "only assistant messages make tool calls")
        _check_tool_calls(message["tool_calls"], f"{where}.tool_calls", error)
    if not out["content"].strip() and not message.get("tool_calls"):
        raise error(f"{where}.content", "is empty" if "content" in message else "missing")
    return out


def _content(content, where, error):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise error(f"{where}[{i}]", f"{kind or type(part).__name__} content is not supported: text parts "
                                             "({'type': 'text', 'text': ...}) only")
            texts.append(part["text"])
        return "".join(texts)
    raise error(where, f"must be a string or a list of text parts, found {type(content).__name__}")


def _check_tool_calls(calls, where, error):
    if not isinstance(calls, list) or not calls:
        raise error(where, "must be a non-empty list of tool calls")
    for i, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise error(f"{where}[{i}]", "must name its function ({'type': 'function', 'function': {'name': ..., "
                                         "'arguments': {...}}})")
        if not isinstance(function.get("arguments", {}), (dict, str)):
            raise error(f"{where}[{i}].function.arguments", "must be an object (or its JSON text)")


def _sharegpt(turns, error):
    if not isinstance(turns, list):
        raise error("conversations", f"must be a list of turns, found {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise error(where, f"must be a turn (an object with from and value), found {type(turn).__name__}")
        if "from" not in turn:
            raise error(f"{where}.from", "missing")
        if turn["from"] not in SHAREGPT_ROLES:
            raise error(f"{where}.from", f"unknown role {turn['from']!r} (expected one of "
                                         f"{', '.join(SHAREGPT_ROLES)})")
        value = turn.get("value")
        if not isinstance(value, str):
            raise error(f"{where}.value", "missing" if value is None else
                        f"must be a string, found {type(value).__name__}")
        if not value.strip():
            raise error(f"{where}.value", "is empty")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": value})
    return messages


def _check_sft(messages, field, error):
    if not any(m["role"] == "assistant" for m in messages):
        raise error(field, "has no assistant message: nothing to train on")
    if messages[-1]["role"] != "assistant":
        raise error(f"{field}[{len(messages) - 1}]", f"the conversation ends with a {messages[-1]['role']} message: "
                                                    "nothing after it is trained (end it with the assistant's turn)")
    if messages[0]["role"] == "assistant":
        raise error(f"{field}[0]", "the conversation starts with an assistant message: it answers nothing")


def prompt_id_of(record, location):
    """A conversational record's prompt_id: its ``prompt_id``, else its ``id``, else its place in the file."""
    for key in ("prompt_id", "id"):
        if key in record:
            return record[key]
    return location


# ---- conversations -> token ids (the chat template's renderings, as inference tokenizes them)

class TurnError(Exception):
    """A conversation the template cannot split into turns: ``field`` (a field path) and ``message``."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field, self.message = field, message


def render(tokenize, messages, tools, generation_prompt):
    """The chat template's text of ``messages`` (with ``tools``), with the generation prompt or not."""
    return tokenize.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=generation_prompt)


def _encode(tokenize, text, messages, field):
    """``text`` (a rendering of ``messages``) tokenized as inference tokenizes it, the template's markers as control
    tokens; a special token's spelling in a message's content stays text (when ``split_special_tokens``), which
    needs each such content found in the rendering as written."""
    contents = [m["content"] for m in messages if m["content"]]
    if not (tokenize.split and any(tokenize.has_special_spelling(c) for c in contents)):
        return tokenize.encode_rendered(text)
    regions, start = [], 0
    for content in contents:
        at = text.find(content, start)
        if at < 0:
            if tokenize.has_special_spelling(content):
                raise TurnError(field, tokenize.SPELLING_MOVED)
            continue
        regions.append((at, at + len(content)))
        start = at + len(content)
    return tokenize.encode_rendered(text, regions)


def _turn(tokenize, messages, i, tools, field):
    """(ids of the history before message ``i`` with the generation prompt, ids of message ``i`` as the model
    generates them after it, whether they were tokenized apart): the turn ends with the template's end-of-turn
    marker, without the whitespace the template puts after it."""
    try:
        history, full = render(tokenize, messages[:i], tools, True), render(tokenize, messages[:i + 1], tools, False)
    except Exception as err:  # noqa: BLE001 - a template that raises on this conversation
        raise TurnError(field, f"the chat template failed: {type(err).__name__}: {err}") from None
    if not full.startswith(history):
        raise TurnError(field, "the chat template's rendering up to this message does not begin with its rendering "
                               "of the history (add_generation_prompt=True): the turn cannot be split from it")
    prompt_ids, full_ids = _encode(tokenize, history, messages[:i], field), _encode(tokenize, full, messages[:i + 1], field)
    apart = full_ids[:len(prompt_ids)] != prompt_ids
    turn = _encode(tokenize, full[len(history):], messages[i:i + 1], field) if apart else full_ids[len(prompt_ids):]
    while turn and tokenize.is_whitespace(turn[-1]):
        turn.pop()
    if not turn:
        raise TurnError(field, "renders to no tokens")
    return prompt_ids, turn, apart


def conversation_records(tokenize, conversation, mask_history=False):
    """(cache records, counts) of an SFT Conversation: every assistant turn trained (only the last with
    ``mask_history``). When the template renders the history as each turn sees it, one record: ``prompt_ids`` up to
    the first trained turn, ``response_ids`` the rest of the conversation, ``response_untrained`` the ranges of it
    that are not trained (the turns between); otherwise one record per turn (``<prompt_id>#<turn>``), counted as
    ``conversations_split``. Raises TurnError."""
    messages, tools = conversation["messages"], conversation["tools"]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = turns[-1:] if mask_history else turns
    pieces = [_turn(tokenize, messages, i, tools, f"messages[{i}]") for i in trained]
    counts = {"assistant_turns_trained": len(pieces), "responses_tokenized_apart": sum(p[2] for p in pieces)}
    joined = all(later[:len(p) + len(t)] == p + t for (p, t, _), (later, _, _) in zip(pieces, pieces[1:]))
    pid = conversation["prompt_id"]
    if not joined:
        counts["conversations_split"] = 1
        return [{"prompt_id": f"{pid}#{k}", "prompt_ids": p, "response_ids": t}
                for k, (p, t, _) in enumerate(pieces, start=1)], counts
    first = pieces[0][0]
    response, untrained = [], []
    for (p, t, _), (before, previous, _) in zip(pieces, [(first, [], False)] + pieces[:-1]):
        gap = p[len(before) + len(previous):]
        if gap:
            untrained += [len(response), len(response) + len(gap)]
        response += gap + t
    record = {"prompt_id": pid, "prompt_ids": first, "response_ids": response}
    if untrained:
        record["response_untrained"] = untrained
    return [record], counts


def preference_record(tokenize, conversation, kind):
    """(the cache record, responses tokenized apart) of a preference Conversation: the prompt's messages rendered
    with the generation prompt, each response the final assistant message after it. Raises TurnError."""
    prompt, tools = conversation["prompt"], conversation["tools"]
    record, apart = {"prompt_id": conversation["prompt_id"]}, 0
    for field in kind.response_fields:
        prompt_ids, ids, separate = _turn(tokenize, prompt + conversation[field], len(prompt), tools, field)
        record["prompt_ids"], record[field + "_ids"] = prompt_ids, ids
        apart += separate
    return record, apart
