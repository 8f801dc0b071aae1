"""Exactness against independent implementations: our SFT / DPO losses, log-probs and gradients vs TRL 1.16 and
transformers, on identical small batches (fp32, CPU). Prints PASS/FAIL per check with the max abs differences.

    python bench/exactness.py            # exit status 0 when every check passes

Models: the benchmark fixture (bench/make_fixture.py) is the reference model; the policy is the same model with
seeded Gaussian noise (std 0.02) added to every weight, so policy != reference and the DPO loss is not ln 2.
Data: 8 pairs / 8 samples of the fixture's dev split (long-tailed: short ones and ones of several hundred tokens).

* SFT: our loss (``utils.objectives.SFTObjective`` -> ``ResponseLogProbs`` on one packed padding-free row with
  ``segment_sdpa`` attention, summed NLL / trained tokens) vs ``model(input_ids, attention_mask, labels).loss`` of
  transformers (padded batch, sdpa, prompt and pad labels = -100); per-token log-probs vs log_softmax of
  transformers' logits; gradients of both losses.
* DPO: our loss (``DPOObjective`` -> ``utils.losses.preference_loss`` with reference per-token log-probs from
  ``get_logits.reference_logps``, the code that writes the cache) vs TRL's ``DPOTrainer.compute_loss`` on the
  same pairs (TRL's collator, padded batch, TRL's fused LM head, reference model run by TRL); per-token and
  per-sequence log-probs of policy and reference vs TRL's ``model(..., labels, fused_lm_head=True).log_probs``;
  gradients of both losses.
* TRL's padding-free SFT collator on CPU sdpa gives the padded loss (the mode benchmarked as trl_packed), so that
  baseline computes the right thing.

Tolerances: 1e-5 absolute for losses and per-token log-probs; per-sequence log-prob SUMS (hundreds of tokens,
values of order 1e3) 1e-5 relative, which is what fp32 summation allows; gradients 1e-5 absolute.
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

FIXTURE = os.path.join(ROOT, "bench", "fixture")
N = 8
BETA = 0.1
results = []


def check(name, diff, tol, kind="abs"):
    ok = bool(diff <= tol)
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}: max {kind} diff {diff:.3e} (tolerance {tol:.0e})")


def pick(records, n):
    """n records: the shortest, the longest and evenly spread ones in between (by length)."""
    def cost(r):
        return sum(len(v) for k, v in r.items() if k.endswith("_ids"))
    order = sorted(range(len(records)), key=lambda i: cost(records[i]))
    idx = sorted({order[round(k * (len(order) - 1) / (n - 1))] for k in range(n)})
    return [records[i] for i in idx]


def grads_diff(named_a, named_b):
    a = {k.split("model.", 1)[-1] if k.startswith("model.model.") else k: p.grad for k, p in named_a}
    worst, ref = 0.0, 0.0
    for k, p in named_b:
        g = a[k] if k in a else a[k.replace("model.", "", 1)]
        worst = max(worst, (g - p.grad).abs().max().item())
        ref = max(ref, p.grad.abs().max().item())
    return worst, ref


def main():
    import subprocess

    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_fixture.py")], check=True)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from get_logits import reference_logps
    from utils.modeling import ResponseLogProbs, load_causal_lm
    from utils.objectives import DPOObjective, Objective, SFTObjective
    from utils.record_io import load_records
    from utils.reference_cache import ReferenceLogProbs
    from utils.schema import KINDS, SampleLayout
    from utils.token_cache import TokenCache
    from utils.token_data import Split

    torch.manual_seed(0)
    ref_dir = os.path.join(FIXTURE, "model")
    tmp = tempfile.mkdtemp(prefix="exactness_")
    policy_dir = os.path.join(tmp, "policy")
    m = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m.save_pretrained(policy_dir)
    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    tokenizer.save_pretrained(policy_dir)

    def hf(path):  # transformers' own attention (sdpa, padded batches with a mask)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")

    # ---------------------------------------------------------------- SFT
    sft = pick(load_records(os.path.join(FIXTURE, "cache", "sft_dev.pt")).records, N)
    print(f"SFT batch: {N} samples, lengths {[len(r['prompt_ids']) + len(r['response_ids']) for r in sft]}")
    ours = ResponseLogProbs(load_causal_lm(policy_dir))  # segment_sdpa on CPU
    ours.train()
    sft_layout = SampleLayout(KINDS["sft"])
    sft_split = Split("dev", "sft dev", "sft_dev.pt", TokenCache.from_records(sft, KINDS["sft"]))
    sft_objective = SFTObjective(sft_layout)
    batch = sft_objective.collate(sft_split, list(range(N))).to("cpu")
    loss_sum, sums = sft_objective.loss(batch, *ours(batch))
    loss_ours = loss_sum / sums["tokens"]
    loss_ours.backward()
    b = sft_layout.pack(sft_split.cache, list(range(N)))
    with torch.no_grad():
        tok_ours = ours(b)[0]

    ref_model = hf(policy_dir)
    ref_model.train()
    L = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in sft)
    ids = torch.full((N, L), tokenizer.pad_token_id)
    mask = torch.zeros((N, L), dtype=torch.long)
    labels = torch.full((N, L), -100)
    for i, r in enumerate(sft):
        seq = r["prompt_ids"] + r["response_ids"]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(r["prompt_ids"]):len(seq)] = torch.tensor(r["response_ids"])
    out = ref_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    logp = torch.log_softmax(out.logits.detach()[:, :-1].float(), -1)
    shifted = labels[:, 1:]
    tok_hf = logp.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)[shifted != -100]
    print(f"  our loss {loss_ours.item():.7f}, transformers model(labels=...).loss {out.loss.item():.7f}")
    check("SFT loss vs transformers model(labels=...).loss", abs(loss_ours.item() - out.loss.item()), 1e-5)
    check("SFT per-token log-probs vs transformers logits", (tok_ours - tok_hf).abs().max().item(), 1e-5)
    gd, gmax = grads_diff(ours.model.named_parameters(), ref_model.named_parameters())
    check(f"SFT gradients vs transformers (largest gradient entry {gmax:.2e})", gd, 1e-5)

    # TRL's padding-free collator on CPU (sdpa builds a block-diagonal mask from position_ids)
    with torch.no_grad():
        ex = [{"input_ids": r["prompt_ids"] + r["response_ids"],
               "labels": [-100] * len(r["prompt_ids"]) + r["response_ids"]} for r in sft]
        pf = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(ex)
        # use_cache=False as SFTTrainer.compute_loss passes it: with a cache object transformers does not look for
        # packed sequences in position_ids and the row silently attends across sequences
        pf_loss = ref_model(input_ids=pf["input_ids"], position_ids=pf["position_ids"], labels=pf["labels"],
                            use_cache=False).loss
    check("TRL padding-free SFT row on CPU sdpa (trl_packed's path) vs padded loss",
          abs(pf_loss.item() - out.loss.item()), 1e-5)

    # ---------------------------------------------------------------- DPO
    dpo = pick(load_records(os.path.join(FIXTURE, "cache", "dpo_dev.pt")).records, N)
    print(f"DPO batch: {N} pairs, prompt+chosen / prompt+rejected lengths "
          f"{[(len(r['prompt_ids']) + len(r['chosen_ids']), len(r['prompt_ids']) + len(r['rejected_ids'])) for r in dpo]}")
    # ours: reference per-token log-probs exactly as get_logits.py computes and caches them
    ref_ours = ResponseLogProbs(load_causal_lm(ref_dir).eval())
    layout = SampleLayout(KINDS["dpo"], share_prompt=True)  # train.py's default layout
    dpo_split = Split("dev", "dpo dev", "dpo_dev.pt", TokenCache.from_records(dpo, KINDS["dpo"]))
    cached = reference_logps(ref_ours, Objective(layout), dpo_split, 1 << 20, 0, 1, "cpu")
    columns = []
    for side in range(2):  # read as utils.reference_cache.read_reference gives them: (values, offsets) per response
        parts = [cached[i][side].numpy() for i in range(N)]
        columns.append((np.concatenate(parts), np.concatenate([[0], np.cumsum([len(p) for p in parts])])))
    dpo_split.reference = ReferenceLogProbs("<in memory>", {}, tuple(columns))
    policy_ours = ResponseLogProbs(load_causal_lm(policy_dir))
    policy_ours.train()
    objective = DPOObjective(layout, "sigmoid", BETA, 0.0, 0.0, 42)
    batch = objective.collate(dpo_split, list(range(N))).to("cpu")
    loss_sum, sums = objective.loss(batch, *policy_ours(batch))
    loss_ours = loss_sum / N
    loss_ours.backward()
    b = SampleLayout(KINDS["dpo"]).pack(dpo_split.cache, list(range(N)))  # unshared: the same targets, in order
    with torch.no_grad():
        pol_tok_ours = policy_ours(b)[0]
    ref_tok_ours = torch.cat([cached[i][0] for i in range(N)] + [cached[i][1] for i in range(N)])
    lengths = b.response_lengths
    seg = torch.repeat_interleave(torch.arange(2 * N), lengths)
    pol_seq_ours = torch.zeros(2 * N).index_add(0, seg, pol_tok_ours)
    ref_seq_ours = torch.zeros(2 * N).index_add(0, seg, ref_tok_ours)

    # TRL
    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    rows = [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
            for r in dpo]
    config = DPOConfig(output_dir=os.path.join(tmp, "trl"), use_cpu=True, bf16=False, beta=BETA,
                       loss_type=["sigmoid"], max_length=None, gradient_checkpointing=False, report_to="none",
                       per_device_train_batch_size=N)
    trainer = PretokenizedDPOTrainer(model=hf(policy_dir), ref_model=hf(ref_dir), args=config,
                                     train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.model.train()
    inputs = trainer.data_collator(rows)
    loss_trl = trainer.compute_loss(trainer.model, inputs)
    loss_trl.backward()
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
    with torch.no_grad():
        pol = trainer.model(**kw, labels=labels, fused_lm_head=True)
        ref = trainer.ref_model(**kw, labels=labels, fused_lm_head=True)
    keep = inputs["completion_mask"][:, 1:].bool()
    pol_tok_trl, ref_tok_trl = pol.log_probs[keep], ref.log_probs[keep]  # row-major: chosen rows, then rejected
    pol_seq_trl, ref_seq_trl = pol.log_probs.sum(1), ref.log_probs.sum(1)

    print(f"  our loss {loss_ours.item():.7f}, TRL DPOTrainer.compute_loss {loss_trl.item():.7f} (ln 2 = 0.6931472)")
    check("DPO loss vs TRL", abs(loss_ours.item() - loss_trl.item()), 1e-5)
    check("DPO policy per-token log-probs vs TRL", (pol_tok_ours - pol_tok_trl).abs().max().item(), 1e-5)
    check("DPO reference per-token log-probs (get_logits) vs TRL", (ref_tok_ours - ref_tok_trl).abs().max().item(), 1e-5)
    rel = lambda a, c: ((a - c).abs() / c.abs().clamp(min=1.0)).max().item()  # noqa: E731
    print(f"  per-sequence policy log-probs: ours {[round(x, 3) for x in pol_seq_ours.tolist()[:4]]}..., "
          f"max abs diff {(pol_seq_ours - pol_seq_trl).abs().max().item():.3e}")
    check("DPO policy per-sequence log-prob sums vs TRL", rel(pol_seq_ours, pol_seq_trl), 1e-5, "rel")
    check("DPO reference per-sequence log-prob sums vs TRL", rel(ref_seq_ours, ref_seq_trl), 1e-5, "rel")
    gd, gmax = grads_diff(policy_ours.model.named_parameters(), trainer.model.named_parameters())
    check(f"DPO gradients vs TRL (largest gradient entry {gmax:.2e})", gd, 1e-5)

    ok = all(results)
    print(f"\n{'PASS' if ok else 'FAIL'}: {sum(results)} of {len(results)} checks passed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
