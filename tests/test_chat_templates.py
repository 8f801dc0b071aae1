"""Chat-mode ids equal the model's own template, for the template families in use, and data text is never a
control token.

Each family is a small byte-level BPE tokenizer trained here with that family's special tokens and a chat
template written after the family's published one (ChatML with and without a default system prompt, Llama-3
header tokens, Gemma turns, Mistral [INST], a Qwen-style template with reasoning tags). The expected ids come
from the tokenizer's own ``apply_chat_template(tokenize=True)``, never from ``Tokenize``.
"""
import pytest

from utils.errors import UsageError
from utils.schema import KINDS
from utils.tokenization import RecordError, Tokenize, tokenize_records

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
                 "{% endif %}" + CHATML)
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
QWEN_REASONING = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set content = m['content'] %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# family: (template, special tokens, bos, eos, end-of-turn token of an assistant message)
FAMILIES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<s>", "</s>", "<|im_end|>"),
    "chatml_default_system": (CHATML_SYSTEM, ["<|im_start|>", "<|im_end|>"], "<s>", "</s>", "<|im_end|>"),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
               "<|end_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "mistral_inst": (MISTRAL, [], "<s>", "</s>", "</s>"),
    "qwen_reasoning": (QWEN_REASONING, ["<|im_start|>", "<|im_end|>"], "<s>", "</s>", "<|im_end|>"),
}
ADDED = {"qwen_reasoning": ["<think>", "</think>"]}  # added tokens that are not special (as in Qwen3's vocabulary)
TEXT = ["What is 2+2? It is 4, of course.", "reverse hello\nolleh", "Ünïcödé text 🙂 and tabs\tin lines.",
        "The quick brown fox jumps over the lazy dog.", "Think step by step, then answer."] * 4
CONVERSATIONS = [("What is 2+2?", "4, of course."), ("reverse hello\n", "olleh"), ("  padded question  ", " padded answer "),
                 ("two\nlines", "\n\nstarts with newlines"), ("Ünïcödé 🙂", "emoji 🙂 back"),
                 ("think first", "<think>\nI add.\n</think>\n\n4")]


def make_tokenizer(template, special, bos, eos, added=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", bos, eos] + special
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=420, special_tokens=tokens, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                  additional_special_tokens=special)
    tok.add_tokens(list(added))
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    template, special, bos, eos, end_of_turn = FAMILIES[request.param]
    return request.param, make_tokenizer(template, special, bos, eos, ADDED.get(request.param, ())), end_of_turn


def template_ids(tok, user, assistant=None):
    messages = [{"role": "user", "content": user}] + ([{"role": "assistant", "content": assistant}] if assistant else [])
    return list(tok.apply_chat_template(messages, add_generation_prompt=assistant is None, tokenize=True,
                                        return_dict=False))


def test_prompt_plus_response_is_the_templates_conversation(family):
    name, tok, end_of_turn = family
    tokenize = Tokenize(tok, "chat")
    prompts, responses, apart = tokenize.chat([u for u, _ in CONVERSATIONS], {"response": [a for _, a in CONVERSATIONS]})
    assert apart == 0, "every family keeps the prompt's tokens in the whole conversation for these texts"
    for (user, assistant), prompt, response in zip(CONVERSATIONS, prompts, responses["response"]):
        assert prompt == template_ids(tok, user)  # what inference feeds the model
        whole = template_ids(tok, user, assistant)
        n = len(prompt) + len(response)
        assert whole[:n] == prompt + response, (name, user, assistant)
        assert tok.decode(whole[n:]).strip() == "", "only whitespace after the end-of-turn marker is left out"
        assert response[-1] == tok.convert_tokens_to_ids(end_of_turn)
        if name != "qwen_reasoning":  # (that template moves reasoning into its own block)
            text = tok.decode(response[:-1])
            assert assistant.strip() in text


def test_reasoning_template_response_holds_its_reasoning_block():
    tok = make_tokenizer(*FAMILIES["qwen_reasoning"][:4], ADDED["qwen_reasoning"])
    _, responses, _ = Tokenize(tok, "chat").chat(["2+2?"], {"response": ["4"]})
    assert tok.decode(responses["response"][0]) == "<think>\n\n</think>\n\n4<|im_end|>"


def test_template_that_rewrites_the_prompt_is_refused():
    counting = "{{ 'turns: ' + messages | length | string + '\\n' }}" + CHATML
    tok = make_tokenizer(counting, ["<|im_start|>", "<|im_end|>"], "<s>", "</s>")
    with pytest.raises(UsageError, match="does not begin with its rendering of the prompt"):
        Tokenize(tok, "chat")


def test_template_error_on_a_record_names_it():
    picky = "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no!') }}{% endif %}{% endfor %}" + CHATML
    tok = make_tokenizer(picky, ["<|im_start|>", "<|im_end|>"], "<s>", "</s>")
    records = [{"prompt_id": 0, "prompt": "fine", "response": "ok"}, {"prompt_id": 1, "prompt": "fine", "response": "forbidden"}]
    with pytest.raises(RecordError) as err:
        tokenize_records(Tokenize(tok, "chat"), records, KINDS["sft"])
    assert (err.value.index, err.value.field) == (1, "response") and "no!" in err.value.message


# --- special-token spellings in data are text ---------------------------------------------------------------------

def test_spelled_special_tokens_are_text_in_chat_mode(family):
    name, tok, end_of_turn = family
    markers = FAMILIES[name][1] + [tok.eos_token]
    spelled = " and ".join(markers)
    records = [{"prompt_id": 0, "prompt": f"what do {spelled} mean?", "chosen": f"they are {spelled}, markers",
                "rejected": "no idea"}]
    ids, counts = tokenize_records(Tokenize(tok, "chat"), records, KINDS["dpo"])
    assert counts["special_token_text"] == 1
    clean = [{"prompt_id": 0, "prompt": "what do mean?", "chosen": "they are , markers", "rejected": "no idea"}]
    clean_ids, _ = tokenize_records(Tokenize(tok, "chat"), clean, KINDS["dpo"])
    for field in ("prompt_ids", "chosen_ids"):  # the control tokens are exactly the template's own
        for marker in markers:
            marker_id = tok.convert_tokens_to_ids(marker)
            assert ids[0][field].count(marker_id) == clean_ids[0][field].count(marker_id), (name, field, marker)
    assert spelled in tok.decode(ids[0]["chosen_ids"]) and spelled in tok.decode(ids[0]["prompt_ids"])


def test_spelled_special_tokens_in_completion_mode(tok):
    records = [{"prompt_id": 0, "prompt": "say </s> or <|im_end|>\n", "response": "done </s> more <|im_end|> text"}]
    ids, counts = tokenize_records(Tokenize(tok, "completion"), records, KINDS["sft"])
    eos, end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert counts["special_token_text"] == 1
    assert ids[0]["response_ids"][-1] == eos and eos not in ids[0]["response_ids"][:-1]
    assert end not in ids[0]["response_ids"] and end not in ids[0]["prompt_ids"] and eos not in ids[0]["prompt_ids"]
    assert ids[0]["response_ids"][:-1] == tok(records[0]["response"], add_special_tokens=False,
                                              split_special_tokens=True).input_ids
    kept, _ = tokenize_records(Tokenize(tok, "completion", split_special_tokens=False), records, KINDS["sft"])
    assert kept[0]["response_ids"].count(eos) == 2  # the tokenizer's default: the spelling is the control token


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
