"""Raw records -> token ids, for SFT and DPO, in completion or chat mode.

Raw records: sft ``{"prompt_id", "prompt", "response"}``; dpo ``{"prompt_id", "prompt", "chosen", "rejected"}``.
Cache records: sft ``{"prompt_id", "prompt_ids", "response_ids"}``; dpo ``{"prompt_id", "prompt_ids",
"chosen_ids", "rejected_ids"}``. A training sequence is always ``prompt_ids + <response>_ids``; the trainer
learns the response part only.

completion mode: the prompt is tokenized as the tokenizer does it (BOS included where the tokenizer adds
one), each response on its own with no special tokens and an EOS appended, so no token merges across the
boundary. SentencePiece-style tokenizers that prepend a space marker to a text are handled by tokenizing the
response behind a newline and removing the newline's ids.

chat mode: the prompt is the chat template applied to one user turn with ``add_generation_prompt=True``,
tokenized as inference tokenizes it; the response is what the template's rendering of the whole two-turn
conversation adds to it, ending with the template's own end-of-turn marker, without the whitespace the template
appends after it. So prompt + response ids are the conversation's tokens by construction, whatever the template
does to the text (default system prompts, trimming, reasoning tags).

In both modes data text is tokenized as text: a special token's spelling in it is never a control token
(``split_special_tokens``, on by default).
"""
import itertools
import json
import multiprocessing
import re
from dataclasses import dataclass

import numpy as np

from utils.conversations import (
    Conversation,
    TurnError,
    conversation_records,
    conversational_field,
    normalise,
    preference_record,
    prompt_id_of,
)
from utils.errors import DataError, UsageError
from utils.sources import parse_sources, read

OVERLONG_POLICIES = ("truncate", "drop", "error")


def validated_records(sources, kind, counts, chat=True, selection=None, columns=None):
    """The (place, record) pairs of raw records to tokenize, checked one by one as they are read
    (``utils.sources.read``: a .jsonl or Parquet file is never held whole): plain records (text fields) as they are,
    conversational ones (``utils.conversations``; ``chat``: the prompt type renders them) as a normalised
    ``Conversation``. A place is (the source's name, the record's place in it). ``sources``: a ``--*_dataset_path``
    value or its list of ``utils.sources.Source``; ``selection``: per source None (every record) or the sorted
    indices of the records to keep (``utils.sources.select``); every record is checked either way. ``columns``
    ({our field: the source's column}) renames columns. Records of a paired kind whose responses are equal (DPO's
    chosen equals rejected) are left out. ``counts`` gets ``records_in`` (read), ``records_in_by_source`` and
    ``dropped_chosen_equals_rejected``.

    Raises DataError naming the source, the record and the field (as the source names it) for the first bad one.
    """
    sources = parse_sources(sources) if isinstance(sources, str) else sources
    theirs = {ours: column for ours, column in (columns or {}).items()}
    counts.update(records_in=0, records_in_by_source=[], dropped_chosen_equals_rejected=0)
    first_seen, fields = {}, kind.text_fields
    for source, keep in zip(sources, selection or [None] * len(sources)):
        counts["records_in_by_source"].append(0)
        wanted = iter(keep) if keep is not None else None
        next_wanted = next(wanted, None) if wanted else None
        for index, (place, record) in enumerate(read(source, columns)):
            counts["records_in_by_source"][-1] += 1
            where = (source.name, place)

            def error(field, message):
                head = re.match(r"[^.\[]*", field).group()
                return DataError(source.name, message, where=place,
                                 field=theirs[head] + field[len(head):] if head in theirs else field)
            record = _validated(record, kind, fields, chat, error, place if len(sources) == 1 else
                                f"{source.name} {place}", first_seen)
            if wanted is not None:
                if index != next_wanted:
                    continue
                next_wanted = next(wanted, None)
            counts["records_in"] += 1
            if record is None:
                counts["dropped_chosen_equals_rejected"] += 1
                continue
            yield where, record


def _validated(record, kind, fields, chat, error, place, first_seen):
    """One raw record checked (``validated_records``): the record or its Conversation, None for a paired record
    whose responses are equal. ``place``: the record's place, its prompt_id where it has none."""
    conversational = conversational_field(record)
    if conversational:
        if not chat:
            raise error(conversational, "a conversation (message list) is rendered by the chat template: tokenize it "
                               "with --prompt_type chat")
        prompt_id = prompt_id_of(record, place)
    elif "prompt_id" not in record:
        raise error("prompt_id", "missing")
    else:
        prompt_id = record["prompt_id"]
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
        raise error("prompt_id", f"must be a string or an integer, found {type(prompt_id).__name__}")
    if prompt_id in first_seen:
        raise error("prompt_id", f"duplicate prompt_id {prompt_id!r} (first at {first_seen[prompt_id]})")
    first_seen[prompt_id] = place
    if conversational:
        record = normalise(record, kind, error)
        record["prompt_id"] = prompt_id
        responses = [json.dumps(record[f], sort_keys=True) for f in kind.response_fields] if kind.paired else []
    else:
        for field in fields:
            if field not in record:
                raise error(field, "missing")
            if not isinstance(record[field], str):
                raise error(field, f"must be a string, found {type(record[field]).__name__}")
            if not record[field].strip():
                raise error(field, "is empty")
        responses = [record[f] for f in kind.response_fields]
    return None if kind.paired and len(set(responses)) == 1 else record


class RecordError(Exception):
    """A record that cannot be tokenized: ``index`` in the list given to ``tokenize_records``, the ``field``."""

    def __init__(self, index, field, message):
        super().__init__(message)
        self.index, self.field, self.message = index, field, message


class Tokenize:
    """Turns prompt texts and response texts into ids for one tokenizer and prompt type.

    Data text is tokenized as text: the spelling of a special token in it (``</s>``, ``<|im_end|>``) becomes
    ordinary tokens, never the control token (``split_special_tokens``; ``False`` keeps the tokenizer's default,
    which turns them into control tokens). The only control tokens are the ones the tokenizer adds itself (BOS),
    the EOS appended in completion mode and the chat template's own markers.
    """

    SENTINEL = "\u2063RESPONSE\u2063"  # text that no template rewrites, to locate the assistant content
    SPELLING_MOVED = ("holds the spelling of a special token, and the chat template changes the text around it: it "
                      "cannot be told from the template's markers (remove it, or pass --split_special_tokens false)")

    def __init__(self, tokenizer, prompt_type, split_special_tokens=True):
        """Raises UsageError for a prompt type the tokenizer cannot serve (no EOS, no or unusable chat template)."""
        self.tokenizer, self.prompt_type, self.split = tokenizer, prompt_type, split_special_tokens
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        spellings = sorted({tokenizer.convert_ids_to_tokens(i) for i in self.special_ids}, key=len, reverse=True)
        self._spelling = re.compile("|".join(map(re.escape, spellings))) if spellings else None
        self._whitespace = {}  # token id -> whether it decodes to whitespace only
        if prompt_type == "completion":
            if tokenizer.eos_token_id is None:
                raise UsageError("the tokenizer has no eos_token: completion mode ends every response with EOS")
            # A SentencePiece-style tokenizer encodes "a" with a leading space marker but "\na" without one.
            newline = self._encode(["\n"])[0]
            self._newline_prefix = newline if self._encode(["\na"])[0] != newline + self._encode(["a"])[0] else None
        elif prompt_type == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise UsageError("--prompt_type chat needs a tokenizer with a chat_template")
            self._newline_prefix = None
            self._prompt_frame, self._response_frame = self._template_frames()
        else:
            raise UsageError(f"unknown prompt_type {prompt_type!r}: expected completion or chat")

    def has_special_spelling(self, text):
        return self._spelling is not None and self._spelling.search(text) is not None

    def _encode(self, texts, add_special_tokens=False, split=None):
        return self.tokenizer(list(texts), add_special_tokens=add_special_tokens, return_attention_mask=False,
                              return_token_type_ids=False,
                              split_special_tokens=self.split if split is None else split)["input_ids"]

    # ---- chat

    def _render(self, user, assistant=None):
        messages = [{"role": "user", "content": user}]
        if assistant is None:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": assistant}],
                                                  tokenize=False)

    def _template_frames(self):
        """The template text around the user content of the prompt rendering, and around the assistant content
        after the prompt in the whole conversation's rendering (each as (before, after)). Refuses a template whose
        whole-conversation rendering does not begin with its prompt rendering."""
        prompt, full = self._render(self.SENTINEL), self._render(self.SENTINEL, self.SENTINEL + "\u2063")
        if not full.startswith(prompt) or self.SENTINEL not in prompt:
            raise UsageError("the chat template's rendering of a conversation does not begin with its rendering of "
                             "the prompt (add_generation_prompt=True): prompt and response cannot be split")
        rest = full[len(prompt):]
        if self.SENTINEL + "\u2063" not in rest:
            raise UsageError("the chat template does not render the assistant's message after the prompt")
        before, after = rest.split(self.SENTINEL + "\u2063", 1)
        if not after.strip():
            raise UsageError("the chat template puts no end-of-turn marker after an assistant message")
        return tuple(prompt.split(self.SENTINEL, 1)), (before, after)

    def _text_regions(self, text, frame, offset=0):
        """The span of the data text in ``text`` rendered with ``frame`` (before, after), or None."""
        before, after = frame
        if text.startswith(before, offset) and text.endswith(after) and len(text) - len(after) >= offset + len(before):
            return offset + len(before), len(text) - len(after)
        return None

    def _encode_as_text_in(self, text, regions):
        """``text`` tokenized with the template's markers as control tokens and every special-token spelling
        inside ``regions`` (the data's spans) as text."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if token in self.special_ids and any(lo <= a and b <= hi for lo, hi in regions):
                out += self._encode([text[a:b]], split=True)[0]
            else:
                out.append(token)
        return out

    def chat(self, prompt_texts, response_texts):
        """(prompt ids, {field: response ids}, responses tokenized apart) in chat mode; ``response_texts`` maps a
        field to its texts.

        The prompt is the template's rendering of the user turn with the generation prompt, tokenized as
        inference tokenizes it. A response is the rest of the whole two-turn conversation's tokens, so prompt +
        response ids are that conversation's tokens, except for whitespace the template appends after the
        end-of-turn marker, which is left out. Where tokens of the whole conversation merge across the prompt's
        end (a response starting with whitespace, for some tokenizers), the response is the rest of the text
        tokenized on its own; those are counted."""
        prompts = [self._render_record(i, "prompt", t) for i, t in enumerate(prompt_texts)]
        prompt_ids = self._encode_rendered(prompts, [[self._text_regions(p, self._prompt_frame)] for p in prompts],
                                           prompt_texts, "prompt")
        out, apart = {}, 0
        for field, texts in response_texts.items():
            fulls = [self._render_record(i, field, user, assistant)
                     for i, (user, assistant) in enumerate(zip(prompt_texts, texts))]
            for i, (prompt, full) in enumerate(zip(prompts, fulls)):
                if not full.startswith(prompt):
                    raise RecordError(i, field, "the chat template's rendering of the conversation does not begin "
                                                "with its rendering of the prompt: prompt and response cannot be split")
            regions = [[self._text_regions(p, self._prompt_frame), self._text_regions(f, self._response_frame, len(p))]
                       for p, f in zip(prompts, fulls)]
            data_texts = [a + b for a, b in zip(prompt_texts, texts)]
            full_ids = self._encode_rendered(fulls, regions, data_texts, field)
            responses = []
            for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
                if f[:len(p)] == p:
                    response = f[len(p):]
                else:  # tokens merge across the prompt's end: the rest of the rendering on its own
                    apart += 1
                    cut = len(prompts[i])
                    rest = [None if r is None else (r[0] - cut, r[1] - cut) for r in regions[i][1:]]
                    response = self._encode_one(fulls[i][cut:], rest, data_texts[i], i, field)
                while response and self.is_whitespace(response[-1]):
                    response.pop()
                responses.append(response)
            out[field] = responses
        return prompt_ids, out, apart

    def _render_record(self, index, field, user, assistant=None):
        try:
            return self._render(user, assistant)
        except Exception as err:  # noqa: BLE001 - a template that raises on this record's text
            raise RecordError(index, field, f"the chat template failed: {type(err).__name__}: {err}") from None

    def _encode_rendered(self, rendered, regions, data_texts, field):
        """Rendered conversations tokenized as the template's own; a record whose data text holds a special-token
        spelling gets that spelling as text (when splitting), which needs the data's spans in the rendering."""
        ids = self._encode(rendered, split=False)
        for i, text in enumerate(data_texts):
            if self.split and self.has_special_spelling(text):
                ids[i] = self._encode_one(rendered[i], regions[i], text, i, field)
        return ids

    def _encode_one(self, rendered, regions, data_text, index, field):
        if not (self.split and self.has_special_spelling(data_text)):
            return self._encode([rendered], split=False)[0]
        if any(r is None for r in regions):
            raise RecordError(index, field, self.SPELLING_MOVED)
        return self._encode_as_text_in(rendered, regions)

    def encode_rendered(self, text, regions=None):
        """A template's rendering ``text`` tokenized as inference tokenizes it (its markers as control tokens);
        with ``regions`` ((start, end) character spans of data text), special-token spellings inside them as text."""
        return self._encode_as_text_in(text, regions) if regions else self._encode([text], split=False)[0]

    def is_whitespace(self, token):
        """Whether a (non-special) token decodes to whitespace only: what a template puts after its end-of-turn
        marker, left out of a response."""
        if token not in self._whitespace:
            self._whitespace[token] = token not in self.special_ids and not self.tokenizer.decode([token]).strip()
        return self._whitespace[token]

    # ---- completion

    def prompts(self, texts):
        """Completion mode: each prompt as the tokenizer encodes it (BOS where it adds one)."""
        return self._encode(texts, add_special_tokens=True)

    def responses(self, texts):
        """Completion mode: each response on its own, then EOS."""
        eos = self.tokenizer.eos_token_id
        return [x + [eos] for x in self._continuation(texts)]

    def _continuation(self, texts):
        """Texts tokenized as they would continue a preceding text: without a leading space marker."""
        if self._newline_prefix is None:
            return self._encode(texts)
        n = len(self._newline_prefix)
        return [x[n:] if x[:n] == self._newline_prefix else self._behind_rare_char(t)
                for x, t in zip(self._encode("\n" + t for t in texts), texts)]

    def _behind_rare_char(self, text):
        """Ids of a response whose first characters merge with a "\n" before them: tokenized behind U+2063
        instead, which a vocabulary rarely holds (so an unknown token or bytes, merging with nothing)."""
        prefix, ids = self._encode(["\u2063", "\u2063" + text])
        if ids[:len(prefix)] == prefix:
            return ids[len(prefix):]
        return self._encode([text])[0]


def tokenize_chunk(tokenize, records, kind, mask_history=False):
    """(cache records, counts, the index in ``records`` of each cache record) of validated records, plain ones
    (``tokenize_records``, in runs) and Conversations (``utils.conversations``: an SFT conversation gives one
    record, or one per assistant turn where the template renders the history differently; ``mask_history``: only
    the last assistant turn trained). Raises RecordError (with the index in ``records``)."""
    out, origins, counts = [], [], {}

    def add(ids, index, more):
        out.extend(ids)
        origins.extend(index)
        for key, value in more.items():
            counts[key] = counts.get(key, 0) + value
    for is_conversation, run in itertools.groupby(enumerate(records), lambda ir: isinstance(ir[1], Conversation)):
        run = list(run)
        if is_conversation:
            for i, conversation in run:
                ids, more = _conversation(tokenize, conversation, kind, mask_history, i)
                add(ids, [i] * len(ids), more)
            continue
        try:
            ids, more = tokenize_records(tokenize, [r for _, r in run], kind)
        except RecordError as err:
            raise RecordError(run[err.index][0], err.field, err.message) from None
        add(ids, [i for i, _ in run], more)
    return out, counts, origins


def _conversation(tokenize, conversation, kind, mask_history, index):
    """(cache records, counts) of one Conversation; RecordError at ``index`` for a TurnError."""
    try:
        if kind.paired:
            record, apart = preference_record(tokenize, conversation, kind)
            records, counts = [record], {"responses_tokenized_apart": apart}
        else:
            records, counts = conversation_records(tokenize, conversation, mask_history)
    except TurnError as err:
        raise RecordError(index, err.field, err.message) from None
    messages = conversation.get("messages") or conversation["prompt"] + sum(
        (conversation[f] for f in kind.response_fields), [])
    special = any(tokenize.has_special_spelling(m["content"]) for m in messages)
    return records, {"conversations": 1, **counts, "special_token_text": int(special)}


def tokenize_records(tokenize, records, kind):
    """(token ids of validated raw records in cache-record form, counts): ``special_token_text`` records whose
    text holds a special token's spelling, ``responses_tokenized_apart`` (chat mode, see ``Tokenize.chat``).
    Raises RecordError (with the index in ``records``) for a record the tokenizer or the template cannot take."""
    fields = kind.response_fields
    apart = 0
    try:
        if tokenize.prompt_type == "chat":
            prompt_ids, response_ids, apart = tokenize.chat([r["prompt"] for r in records],
                                                            {f: [r[f] for r in records] for f in fields})
        else:
            prompt_ids = tokenize.prompts([r["prompt"] for r in records])
            response_ids = {f: tokenize.responses([r[f] for r in records]) for f in fields}
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001 - the tokenizer failed: find the record and the field, name them
        if len(records) == 1:
            field = next((f for f in kind.text_fields if _fails(tokenize, records[0][f])), None)
            raise RecordError(0, field, f"the tokenizer failed: {type(err).__name__}: {err}") from None
        for i, record in enumerate(records):
            try:
                tokenize_records(tokenize, [record], kind)
            except RecordError as one:
                raise RecordError(i, one.field, one.message) from None
        raise
    out = [{"prompt_id": r["prompt_id"], "prompt_ids": prompt_ids[i], **{f + "_ids": response_ids[f][i] for f in fields}}
           for i, r in enumerate(records)]
    counts = {"special_token_text": sum(any(tokenize.has_special_spelling(r[f]) for f in kind.text_fields)
                                        for r in records),
              "responses_tokenized_apart": apart}
    return out, counts


def _fails(tokenize, text):
    try:
        tokenize.tokenizer(text)
        return False
    except Exception:  # noqa: BLE001
        return True


def apply_max_length(records, kind, max_length, policy, describe):
    """Apply the over-long policy to cache records; return (kept records, counts by outcome).

    A sequence is prompt + one response. ``truncate`` keeps the prompt and cuts each response's tail to
    fit (its EOS is then lost); a record whose prompt leaves no room for a response token is dropped; a
    response's untrained spans are cut with it, and a response cut inside one ends where it begins (a sequence
    never ends with tokens it does not train). ``drop`` drops over-long records; ``error`` raises.
    ``describe(i)`` locates record i for messages.
    """
    kept = []
    counts = {"truncated": 0, "dropped_too_long": 0, "dropped_prompt_too_long": 0, "dropped_identical_after_truncation": 0}
    fields = kind.response_id_fields
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
        for field, span in kind.untrained:
            if r.get(span):
                r[span], r[field] = _cut_spans(r[span], r[field])
        if kind.paired and all(r[f] == r[fields[0]] for f in fields[1:]):
            counts["dropped_identical_after_truncation"] += 1
            continue
        counts["truncated"] += 1
        kept.append(r)
    return kept, counts


def _cut_spans(spans, ids):
    """(spans, ids) of a response cut to ``len(ids)`` tokens: spans past the end dropped, one the cut falls in (or
    ends at) removed with the ids from its start on."""
    kept = []
    for start, end in zip(spans[0::2], spans[1::2]):
        if end >= len(ids):
            return kept, ids[:start] if start < len(ids) else ids
        kept += [start, end]
    return kept, ids


def length_summary(cache):
    """mean/p50/p90/max of the sequence lengths (prompt + response; both sequences of a DPO pair) of a TokenCache."""
    lengths = cache.lengths()
    seqs = np.concatenate([lengths["prompt_ids"] + lengths[f] for f in cache.kind.response_id_fields])
    if seqs.size == 0:
        return {}
    return {"mean": float(seqs.mean()), "p50": float(np.percentile(seqs, 50)), "p90": float(np.percentile(seqs, 90)),
            "max": int(seqs.max())}


# ---- the one route from a raw record file to the records of a token-id cache

CHUNK = 1000  # records per tokenizer call / per task sent to a worker process
MIN_RECORDS_PER_WORKER = 20_000  # below this, starting a worker (imports + tokenizer load) costs more than it saves
MAX_LENGTH_COUNTS = ("truncated", "dropped_too_long", "dropped_prompt_too_long", "dropped_identical_after_truncation")


@dataclass(frozen=True)
class TokenizeSettings:
    """How raw records become ids, as a cache's ``.meta.json`` records it (test files are tokenized with the
    training cache's): the prompt type, whether special-token spellings stay text, the --max_length policy, whether
    a conversation's earlier assistant turns are trained."""
    prompt_type: str
    split_special_tokens: bool
    max_length: int
    overlong: str
    mask_history: bool = False  # conversations: only the last assistant turn trained

    @classmethod
    def of_cache(cls, meta):
        """The settings a cache's meta records (a cache from before split_special_tokens or mask_history was
        recorded kept special token spellings as control tokens and trained every turn)."""
        return cls(meta["prompt_type"], meta.get("split_special_tokens", False), meta["max_length"], meta["overlong"],
                   meta.get("mask_history", False))


_worker = {}


def _init_worker(model, prompt_type, split_special_tokens):
    from utils.hf_loading import load_tokenizer

    _worker["tokenize"] = Tokenize(load_tokenizer(model), prompt_type, split_special_tokens)


def _tokenize_chunk(job):
    """``tokenize_chunk`` of a chunk, or the chunk's RecordError (returned, not raised: it crosses processes)."""
    records, kind, tokenize, mask_history = job
    try:
        return tokenize_chunk(tokenize or _worker["tokenize"], records, kind, mask_history)
    except RecordError as err:
        return err


def _chunks(located, size):
    """Lists of up to ``size`` items from an iterator of them."""
    while True:
        chunk = list(itertools.islice(located, size))
        if not chunk:
            return
        yield chunk


def tokenize_file(src, kind, settings, tokenize, append, *, model=None, num_proc=1, records_in=None, desc=None,
                  selection=None, columns=None):
    """Tokenize the validated records of ``src`` (a ``--*_dataset_path`` value or its Sources: ``validated_records``,
    with its ``selection`` and ``columns``) chunk by chunk, apply the --max_length policy of ``settings`` (a
    TokenizeSettings) and pass the kept cache records of each chunk to ``append`` (a list's ``extend``, a
    ``ColumnWriter.append``): memory stays bounded by the chunks, not the input. ``tokenize``: the Tokenize of this
    process; ``num_proc`` > 1 with ``records_in`` of at least MIN_RECORDS_PER_WORKER records each: worker processes
    loading the tokenizer of ``model`` (a bounded number of chunks in flight). ``desc``: a progress bar's label.
    Returns the counts: ``records_in``, ``dropped_chosen_equals_rejected``, MAX_LENGTH_COUNTS and tokenize_records'
    counts; a record the tokenizer or the template cannot take is a DataError naming it."""
    from utils.run_log import progress_bar

    counts, read = {}, {}
    workers = min(num_proc, (records_in or 0) // MIN_RECORDS_PER_WORKER)
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(
            workers, _init_worker, (model, settings.prompt_type, settings.split_special_tokens))
    try:
        with progress_bar(records_in, desc, "rec", enabled=desc is not None) as bar:
            located = validated_records(src, kind, read, chat=settings.prompt_type == "chat", selection=selection,
                                        columns=columns)
            for wave in _chunks(_chunks(located, CHUNK), 4 * max(workers, 1)):
                jobs = [([r for _, r in chunk], kind, None if pool else tokenize, settings.mask_history)
                        for chunk in wave]
                for chunk, result in zip(wave, pool.map(_tokenize_chunk, jobs) if pool else map(_tokenize_chunk, jobs)):
                    places = [where for where, _ in chunk]
                    if isinstance(result, RecordError):
                        name, place = places[result.index]
                        raise DataError(name, result.message, where=place, field=result.field)
                    ids, text_counts, origins = result
                    kept, chunk_counts = apply_max_length(
                        ids, kind, settings.max_length, settings.overlong,
                        lambda i, msg: DataError(places[origins[i]][0], msg, where=places[origins[i]][1]))
                    append(kept)
                    for key, value in {**chunk_counts, **text_counts}.items():
                        counts[key] = counts.get(key, 0) + value
                    bar.update(len(chunk))
    finally:
        if pool:
            pool.terminate()
    return {**read, **counts}
