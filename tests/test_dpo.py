"""floe.run.dpo: the preference loss against TRL's, per-sequence log-probs from packed pairs against
each sequence run alone."""
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from floe.config import PRESETS
from floe.data import DataConfig, build_dataset
from floe.model import ArcticForCausalLM
from floe.run.dpo import DPOConfig, local_sequences, objective_errors, preference_loss, sequence_logps

# A batch with known values: policy and reference log-probs of 4 pairs, answer lengths.
CHOSEN = torch.tensor([-12.0, -30.5, -7.25, -50.0])
REJECTED = torch.tensor([-14.0, -29.0, -9.5, -41.0])
REF_CHOSEN = torch.tensor([-13.0, -31.0, -7.0, -48.0])
REF_REJECTED = torch.tensor([-13.5, -30.0, -8.0, -45.0])
TOKENS_C = torch.tensor([4.0, 10.0, 3.0, 20.0])
TOKENS_R = torch.tensor([5.0, 9.0, 4.0, 16.0])


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    out = preference_loss(DPOConfig(beta=0.1), CHOSEN, REJECTED, CHOSEN.clone(), REJECTED.clone(), TOKENS_C, TOKENS_R)
    assert torch.equal(out.losses, torch.full((4,), math.log(2)))  # -log sigmoid(0), exactly
    assert torch.equal(out.chosen_rewards, torch.zeros(4)) and torch.equal(out.rejected_rewards, torch.zeros(4))


def test_sigmoid_loss_by_hand():
    out = preference_loss(DPOConfig(beta=0.5), CHOSEN[:1], REJECTED[:1], REF_CHOSEN[:1], REF_REJECTED[:1],
                          TOKENS_C[:1], TOKENS_R[:1])
    # chosen reward 0.5 * (-12 + 13) = 0.5; rejected 0.5 * (-14 + 13.5) = -0.25; loss = log(1 + e^-0.75)
    assert out.chosen_rewards.item() == 0.5 and out.rejected_rewards.item() == -0.25
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-7)


def _trl_dpo(beta):
    """TRL's DPOTrainer._compute_loss on the batch above (precomputed reference log-probs), through a
    stand-in model whose per-token log-probs sum to the given sequence values."""
    from trl import DPOTrainer

    n, width = len(CHOSEN), 3
    per_token = torch.zeros(2 * n, width)
    per_token[:, 0] = torch.cat([CHOSEN, REJECTED])  # the batch is [chosen..., rejected...]
    mask = torch.ones(2 * n, width + 1, dtype=torch.long)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * n, width),
                              mean_logits=torch.zeros(2 * n, width), is_top1=torch.zeros(2 * n, width, dtype=torch.bool))
    model = lambda **kwargs: outputs  # noqa: E731
    ident = lambda t: t  # noqa: E731
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=ident, gather_for_metrics=ident),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, width + 1, dtype=torch.long), "attention_mask": mask,
              "completion_mask": mask, "ref_chosen_logps": REF_CHOSEN, "ref_rejected_logps": REF_REJECTED}
    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_sigmoid_loss_and_rewards_equal_trls(beta):
    trl_loss, trl_metrics = _trl_dpo(beta)
    out = preference_loss(DPOConfig(beta=beta), CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, TOKENS_C, TOKENS_R)
    assert out.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)
    margins = out.chosen_rewards - out.rejected_rewards
    ours = {"rewards/chosen": out.chosen_rewards.mean(), "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": margins.mean(), "rewards/accuracies": (margins > 0).float().mean(),
            "logps/chosen": CHOSEN.mean(), "logps/rejected": REJECTED.mean()}
    for key, value in ours.items():
        assert value.item() == pytest.approx(trl_metrics[key], abs=1e-6), key


def test_simpo_equals_trls_cpo_simpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    beta, gamma = 2.0, 0.8
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device="cpu"))
    # TRL's CPO takes average log-probs per answer token (average_log_prob=True for simpo)
    losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(fake, CHOSEN / TOKENS_C, REJECTED / TOKENS_R)
    out = preference_loss(DPOConfig(beta=beta, loss="simpo", simpo_gamma=gamma), CHOSEN, REJECTED, None, None,
                          TOKENS_C, TOKENS_R)
    torch.testing.assert_close(out.losses, losses, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, chosen_r, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, rejected_r, rtol=0, atol=1e-6)


def test_config_errors_name_the_keys():
    with pytest.raises(ValueError) as e:
        DPOConfig(beta=0.0, loss="ipo", simpo_gamma=-1.0)
    for key in ("dpo.beta", "dpo.loss", "dpo.simpo_gamma"):
        assert key in str(e.value)
    assert "data=preference" in objective_errors("dpo", "jsonl")[0]
    assert "train.objective=dpo" in objective_errors("sft", "preference")[0]
    assert objective_errors("dpo", "preference") == [] and objective_errors("sft", "jsonl") == []


def write_pairs(path, n=12, seed=0):
    """n arithmetic pairs (chosen right, rejected wrong), some conversational with a system turn."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(0, 30), rng.randint(0, 30)
            q, right, wrong = f"What is {a} + {b}?", str(a + b), str(a + b + rng.choice([-3, -1, 1, 2]))
            if i % 3 == 2:
                prompt = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": q}]
                rec = {"chosen": prompt + [{"role": "assistant", "content": right}],
                       "rejected": prompt + [{"role": "assistant", "content": wrong}]}
            else:
                rec = {"prompt": q, "chosen": right * (1 + i % 2), "rejected": wrong}
            f.write(json.dumps(rec) + "\n")


def test_packed_sequence_logps_equal_each_sequence_alone(tmp_path):
    write_pairs(tmp_path / "p.jsonl")
    _, ds = build_dataset(DataConfig(name="preference", paths=[str(tmp_path / "p.jsonl")], seq_len=96,
                                     cache_dir=str(tmp_path / "cache")), seed=0)
    torch.manual_seed(0)
    model = ArcticForCausalLM(PRESETS["tiny"]).eval()
    rows = list(range(ds.num_rows))
    mb = ds.batch(rows)
    assert ds.num_rows < 12 and len(rows) >= 2  # several pairs share a row
    local, examples = local_sequences(ds.example_ids(rows))
    assert len(examples) == 24 and torch.equal(examples, torch.arange(24))  # every pair, both halves
    with torch.no_grad():
        out = model(mb["input_ids"], position_ids=mb["position_ids"], attention_mask=mb["attention_mask"],
                    dropless=True)
        logps, tokens = sequence_logps(out.logits, mb["labels"], mb["position_ids"], local, len(examples))
        # Reference: each sequence alone in a batch of one, log-softmax and a loop over its trained tokens.
        ids = ds.example_ids(rows)
        for k, ex in enumerate(examples.tolist()):
            r, cols = (ids == ex).nonzero(as_tuple=True)
            seq, trained = mb["input_ids"][r, cols], mb["labels"][r, cols] != -100
            logp = torch.log_softmax(model(seq[None], dropless=True).logits[0].double(), -1)
            want = sum(logp[t - 1, seq[t]] for t in range(1, len(seq)) if trained[t])
            assert tokens[k].item() == int(trained[1:].sum()) > 0
            assert logps[k].item() == pytest.approx(want.item(), abs=2e-5), ex
