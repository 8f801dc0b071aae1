"""DPO pairs/s with each pair's prompt once (``--share_prompt``, the default) against prompt + chosen and
prompt + rejected as two sequences, for long prompts: the training step (forward + backward) and the reference pass.

    python bench/shared_prompt_bench.py                    # CPU, ~1.5 minutes on the 2-core machine
    python bench/shared_prompt_bench.py --device cuda --pairs 256 --hidden 2048 --layers 16 --budget 32768 --bf16

Random pairs (prompt ~``--prompt`` tokens, responses ~``--response``, each uniform within +-25%) and a random-init
Llama (demo tokenizer vocabulary) go through the trainer's own code: ``DPOObjective`` (sigmoid loss, made-up
reference log-probs), the token-budget plan (``--budget`` tokens per micro-batch) and ``ResponseLogProbs`` with
the default attention of the device. Reported per layout: tokens per pair, micro-batches, pairs/s of training
(forward + backward of every micro-batch; no optimizer step, the same for both) and of the reference pass
(forward under no_grad), the best of ``--repeats`` timed epochs after a warm-up micro-batch; and the largest
difference of the reference log-probs between the two layouts (they are the same computation).
"""
import argparse
import os
import time

import numpy as np
import torch

from utils import attention
from utils.batching import eval_batches, token_budget_plan
from utils.modeling import ResponseLogProbs
from utils.objectives import DPOObjective
from utils.reference_cache import ReferenceLogProbs
from utils.schema import KINDS, SampleLayout
from utils.token_cache import TokenCache
from utils.token_data import Split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pairs(n, prompt, response, vocab, seed=0):
    rng = np.random.default_rng(seed)

    def ids(mean):
        return rng.integers(3, vocab, int(rng.integers(int(mean * 0.75), int(mean * 1.25) + 1))).tolist()

    records = [{"prompt_id": i, "prompt_ids": ids(prompt), "chosen_ids": ids(response), "rejected_ids": ids(response)}
               for i in range(n)]
    cache = TokenCache.from_records(records, KINDS["dpo"])
    columns = []
    for response_field in ("chosen_ids", "rejected_ids"):
        offsets = np.concatenate(([0], np.cumsum(KINDS["dpo"].trained_tokens(cache.lengths(), response_field))))
        columns.append((-rng.random(int(offsets[-1])).astype(np.float32), offsets))
    return Split("train", "random pairs", "<random>", cache, reference=ReferenceLogProbs("<made up>", {}, tuple(columns)))


def make_model(args, vocab, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), vocab_size=vocab,
                         max_position_embeddings=4 * (args.prompt + 2 * args.response))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.resolve("auto", device, args.bf16))
    return ResponseLogProbs(model.to(device))


def timed(device, function, repeats):
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(model, data, share, args, device):
    objective = DPOObjective(SampleLayout(KINDS["dpo"], share), "sigmoid", 0.1, 0.0, 0.0, seed=0)
    costs = objective.costs(data)
    pairs = len(data.cache)

    def loss_of(indices):
        batch = objective.collate(data, indices).to(device)
        return objective.loss(batch, *model(batch))[0]
    plan = token_budget_plan(costs, args.budget, seed=0)
    micro = [plan.order[a:b].tolist() for a, b in zip(plan.mb_bounds[:-1], plan.mb_bounds[1:])]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def train_epoch():
        for indices in micro:
            with autocast:
                loss = loss_of(indices)
            (loss / pairs).backward()
        model.zero_grad(set_to_none=True)

    reference_batches = eval_batches(costs, args.budget)
    logps = {}

    def reference_pass():
        with torch.no_grad(), autocast:
            for indices in reference_batches:
                batch = objective.layout.pack(data.cache, indices)
                logps[tuple(indices)] = (batch.response_lengths, model(batch.to(device))[0].float().cpu())

    with autocast:  # warm-up: allocator, kernels, compiled attention
        loss_of(micro[0]).backward()
    model.zero_grad(set_to_none=True)
    train_s = timed(device, train_epoch, args.repeats)
    reference_s = timed(device, reference_pass, args.repeats)
    per_pair = {}
    for indices, (lengths, values) in logps.items():
        parts = torch.split(values, lengths.tolist())
        for k, i in enumerate(indices):
            per_pair[i] = torch.cat([parts[k], parts[len(indices) + k]])
    return {"tokens_per_pair": costs.mean(), "micro_batches": len(micro), "train_pairs_s": pairs / train_s,
            "reference_pairs_s": pairs / reference_s, "logps": per_pair}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=1000, help="mean prompt tokens")
    parser.add_argument("--response", type=int, default=200, help="mean tokens of each response")
    parser.add_argument("--budget", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(os.path.join(ROOT, "demo", "model")))
    data = make_pairs(args.pairs, args.prompt, args.response, vocab)
    model = make_model(args, vocab, device)
    weights = sum(p.numel() for p in model.parameters())
    print(f"{args.pairs} pairs, prompt ~{args.prompt}, responses ~{args.response} tokens; {weights / 1e6:.1f}M weights, "
          f"{model.model.config._attn_implementation}, {args.budget} tokens per micro-batch, {device}"
          f"{', bf16 autocast' if args.bf16 else ''}, torch threads {torch.get_num_threads()}")
    results = {share: measure(model, data, share, args, device) for share in (False, True)}
    print("| layout | tokens/pair | micro-batches | train pairs/s | reference pairs/s |")
    print("|---|---:|---:|---:|---:|")
    for share, r in results.items():
        print(f"| {'shared prompt' if share else 'prompt per response'} | {r['tokens_per_pair']:.0f} | "
              f"{r['micro_batches']} | {r['train_pairs_s']:.2f} | {r['reference_pairs_s']:.2f} |")
    shared, unshared = results[True], results[False]
    print(f"speed-up: training {shared['train_pairs_s'] / unshared['train_pairs_s']:.2f}x, reference "
          f"{shared['reference_pairs_s'] / unshared['reference_pairs_s']:.2f}x; tokens "
          f"{unshared['tokens_per_pair'] / shared['tokens_per_pair']:.2f}x fewer")
    difference = max((shared["logps"][i] - unshared["logps"][i]).abs().max().item() for i in range(len(data.cache)))
    print(f"largest reference log-prob difference between the layouts: {difference:.2e}")


if __name__ == "__main__":
    main()
