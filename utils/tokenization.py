"""Raw records -> token ids, for SFT and DPO, in completion or chat mode.

Raw records: sft ``{"prompt_id", "prompt", "response"}``; dpo ``{"prompt_id", "prompt", "chosen", "rejected"}``.
Cache records: sft ``{"prompt_id", "prompt_ids", "response_ids"}``; dpo ``{"prompt_id", "prompt_ids",
"chosen_ids", "rejected_ids"}``. A training sequence is always ``prompt_ids + <response>_ids``; the trainer
learns the response part only.

completion mode: the prompt is tokenized as the tokenizer does it (BOS included where the tokenizer adds
one), each response on its own with no special tokens and an EOS appended, so no token merges across the
boundary. SentencePiece-style tokenizers that prepend a space marker to a text are handled by tokenizing the
response behind a newline and removing the newline's ids.

chat mode: the prompt is the chat template applied to one user turn with ``add_generation_prompt=True``;
the response is the text the template puts after that prompt for an assistant turn, ending with the
template's own end-of-turn marker (found by rendering the template, never hard-coded), without the
whitespace the template appends after it.
"""
import numpy as np

from utils.errors import UsageError

RESPONSE_FIELDS = {"sft": ("response",), "dpo": ("chosen", "rejected")}
TEXT_FIELDS = {t: ("prompt",) + fields for t, fields in RESPONSE_FIELDS.items()}
OVERLONG_POLICIES = ("truncate", "drop", "error")


def validate_records(record_file, training_type):
    """Check every record; return (records to keep, their locations, number dropped as chosen == rejected).

    Raises DataError naming the file, the record and the field for the first bad record.
    """
    kept, locations, identical, first_seen = [], [], 0, {}
    for i, record in enumerate(record_file.records):
        if "prompt_id" not in record:
            raise record_file.error(i, "prompt_id", "missing")
        prompt_id = record["prompt_id"]
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
            raise record_file.error(i, "prompt_id", f"must be a string or an integer, found {type(prompt_id).__name__}")
        if prompt_id in first_seen:
            raise record_file.error(i, "prompt_id", f"duplicate prompt_id {prompt_id!r} (first at {first_seen[prompt_id]})")
        first_seen[prompt_id] = record_file.locations[i]
        for field in TEXT_FIELDS[training_type]:
            if field not in record:
                raise record_file.error(i, field, "missing")
            if not isinstance(record[field], str):
                raise record_file.error(i, field, f"must be a string, found {type(record[field]).__name__}")
            if not record[field].strip():
                raise record_file.error(i, field, "is empty")
        if training_type == "dpo" and record["chosen"] == record["rejected"]:
            identical += 1
            continue
        kept.append(record)
        locations.append(record_file.locations[i])
    return kept, locations, identical


class Tokenize:
    """Turns prompt texts and response texts into ids for one tokenizer and prompt type."""

    SENTINEL = "\u2063RESPONSE\u2063"  # text that no template rewrites, to locate the assistant content

    def __init__(self, tokenizer, prompt_type):
        self.tokenizer, self.prompt_type = tokenizer, prompt_type
        if prompt_type == "completion":
            if tokenizer.eos_token_id is None:
                raise UsageError("the tokenizer has no eos_token: completion mode ends every response with EOS")
            # A SentencePiece-style tokenizer encodes "a" with a leading space marker but "\na" without one.
            newline = self._encode(["\n"])[0]
            self._newline_prefix = newline if self._encode(["\na"])[0] != newline + self._encode(["a"])[0] else None
        elif prompt_type == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise UsageError("--prompt_type chat needs a tokenizer with a chat_template")
            self._response_prefix, self._end_of_turn = self._assistant_turn_format()
        else:
            raise UsageError(f"unknown prompt_type {prompt_type!r}: expected completion or chat")

    def _encode(self, texts, add_special_tokens=False):
        return self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]

    def _chat_prompt(self, text):
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)

    def _assistant_turn_format(self):
        """(text before the content, end-of-turn text) of an assistant turn, read off the template."""
        prompt = self._chat_prompt("question")
        full = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "question"}, {"role": "assistant", "content": self.SENTINEL}], tokenize=False)
        if not full.startswith(prompt) or self.SENTINEL not in full[len(prompt):]:
            raise UsageError("the chat template's assistant turn does not extend its generation prompt; "
                             "cannot split prompt and response")
        before, after = full[len(prompt):].split(self.SENTINEL, 1)
        end_of_turn = after.rstrip()
        if not end_of_turn:
            raise UsageError("the chat template puts no end-of-turn marker after an assistant message")
        return before, end_of_turn

    def prompts(self, texts):
        if self.prompt_type == "chat":
            return self._encode(self._chat_prompt(t) for t in texts)
        return self._encode(texts, add_special_tokens=True)

    def responses(self, texts):
        if self.prompt_type == "chat":
            return self._encode(self._response_prefix + t + self._end_of_turn for t in texts)
        if self._newline_prefix is None:
            ids = self._encode(texts)
        else:
            n = len(self._newline_prefix)
            ids = [x[n:] if x[:n] == self._newline_prefix else self._behind_rare_char(t)
                   for x, t in zip(self._encode("\n" + t for t in texts), texts)]
        eos = self.tokenizer.eos_token_id
        return [x + [eos] for x in ids]

    def _behind_rare_char(self, text):
        """Ids of a response whose first characters merge with a "\n" before them: tokenized behind U+2063
        instead, which a vocabulary rarely holds (so an unknown token or bytes, merging with nothing)."""
        prefix, ids = self._encode(["\u2063", "\u2063" + text])
        if ids[:len(prefix)] == prefix:
            return ids[len(prefix):]
        return self._encode([text])[0]


def tokenize_records(tokenize, records, training_type):
    """Token ids of a list of validated raw records, in cache-record form."""
    out = [{"prompt_id": r["prompt_id"]} for r in records]
    for field in TEXT_FIELDS[training_type]:
        texts = [r[field] for r in records]
        ids = tokenize.prompts(texts) if field == "prompt" else tokenize.responses(texts)
        for o, x in zip(out, ids):
            o[field + "_ids"] = x
    return out


def apply_max_length(records, training_type, max_length, policy, describe):
    """Apply the over-long policy to cache records; return (kept records, counts by outcome).

    A sequence is prompt + one response. ``truncate`` keeps the prompt and cuts each response's tail to
    fit (its EOS is then lost); a record whose prompt leaves no room for a response token is dropped.
    ``drop`` drops over-long records; ``error`` raises. ``describe(i)`` locates record i for messages.
    """
    kept = []
    counts = {"truncated": 0, "dropped_too_long": 0, "dropped_prompt_too_long": 0, "dropped_identical_after_truncation": 0}
    fields = [f + "_ids" for f in RESPONSE_FIELDS[training_type]]
    for i, r in enumerate(records):
        n_prompt = len(r["prompt_ids"])
        longest = n_prompt + max(len(r[f]) for f in fields)
        if longest <= max_length:
            kept.append(r)
            continue
        if policy == "error":
            raise describe(i, f"{longest} tokens exceed --max_length {max_length} (choose --overlong truncate or drop)")
        if policy == "drop":
            counts["dropped_too_long"] += 1
            continue
        room = max_length - n_prompt
        if room < 1:
            counts["dropped_prompt_too_long"] += 1
            continue
        r = dict(r, **{f: r[f][:room] for f in fields})
        if training_type == "dpo" and r["chosen_ids"] == r["rejected_ids"]:
            counts["dropped_identical_after_truncation"] += 1
            continue
        counts["truncated"] += 1
        kept.append(r)
    return kept, counts


def length_summary(records, training_type):
    """mean/p50/p90/max of sequence lengths (prompt + response; both sequences of a DPO pair)."""
    lengths = np.array([len(r["prompt_ids"]) + len(r[f + "_ids"])
                        for r in records for f in RESPONSE_FIELDS[training_type]])
    if lengths.size == 0:
        return {}
    return {"mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)), "max": int(lengths.max())}
