"""The model as the trainer sees it: per-token log-probs of the trained tokens of a packed row."""
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.utils import is_flash_attn_2_available

from utils import attention
from utils.hf_loading import pretrained_location


def load_causal_lm(path, attn_implementation="auto", dtype=torch.float32, device="cpu"):
    """A causal LM for padding-free rows. ``auto``: flash-attention 2 on GPU when installed (varlen from
    position_ids), else per-sequence SDPA (``utils.attention``); any transformers name is accepted too."""
    if attn_implementation == "auto":
        on_gpu = torch.device(device).type == "cuda"
        attn_implementation = "flash_attention_2" if on_gpu and is_flash_attn_2_available() else attention.NAME
    location, kwargs = pretrained_location(path)
    model = AutoModelForCausalLM.from_pretrained(location, attn_implementation=attn_implementation, dtype=dtype, **kwargs)
    return model.to(device)


class ResponseLogProbs(torch.nn.Module):
    """Wraps a Hugging Face causal LM.

    The LM head runs only on the hidden states of positions that predict a trained token, so the logits
    tensor is (trained tokens x vocab), not (all tokens x vocab): prompts cost no logits memory.
    Models that post-process logits (final soft-capping, logit scaling) are not supported by this shortcut.
    """

    def __init__(self, model):
        super().__init__()
        if model.base_model is model:
            raise ValueError(f"{type(model).__name__} has no separate base model to take hidden states from")
        self.model = model

    def forward(self, input_ids, position_ids, target_positions, target_ids):
        """Returns (log-probs of ``target_ids``, whether each is the argmax prediction), both (K,)."""
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[0].index_select(0, target_positions)).float()
        token_logps = -F.cross_entropy(logits, target_ids, reduction="none")
        return token_logps, logits.argmax(-1) == target_ids
