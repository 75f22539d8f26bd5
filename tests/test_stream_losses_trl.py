"""DPO and GRPO as users run them under StreamBP, checked against TRL's own trainers.

The references are TRL's `DPOTrainer.compute_loss` and `GRPOTrainer.compute_loss`, built from
their public constructors and configs' defaults, on a batch from TRL's own collator (DPO) or in
the layout its generation step hands the loss (GRPO). One thing is swapped in those trainers:
TRL's fused LM head, which rounds its logits to float32 by design, becomes `_exact_head`, the
same contract (`FusedCausalLMOutput`: position `t` scores label `t + 1`, zero where the label is
-100) in the model's dtype, so that float64 is exact; `test_the_float64_head_is_trls_fused_head`
holds it to TRL's own head to float32 rounding.

The models are Hugging Face Llama in float64 with `use_cache=False` and one change: their
RMSNorm computes in the model's dtype (`_NormInModelDtype`). Hugging Face's computes in float32
whatever the dtype, so a float64 Llama is only float32-exact under streaming
(tests/test_stream.py); with the norm in float64, streamed and TRL agree within 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FLOAT64_TOL, clone_model, relative_error, worst_error
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memcompile.losses import dpo_loss, grpo_loss, sequence_logps, shift_labels
from memcompile.report import recording

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402  (trl installs it)
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

# TRL 1.16 still reads transformers' renamed gradient-checkpointing arguments; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

VOCAB = 256
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, use_cache=False)
CHUNK = 4
STREAM = {"stream": {"chunk_size": CHUNK, "logits_chunk_size": CHUNK}}
"""Stream on, with chunks small enough that every length here takes several."""


class _NormInModelDtype(LlamaRMSNorm):
    """Hugging Face's RMSNorm computed in the input's dtype instead of float32."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _norms_in_model_dtype(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if type(module) is LlamaRMSNorm:
            module.__class__ = _NormInModelDtype
    return model


def _llama(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).double()
    return _norms_in_model_dtype(model)


def _tokenizer():
    """A word-level tokenizer over the vocabulary ("t0" ... "t255"): the trainers need one, and
    nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0",
                                                eos_token="t1", unk_token="t2")


def _next_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`log p(labels[:, t + 1])` under `logits[:, t]`, zero where that label is -100: shape
    `(batch, length - 1)`, in the logits' dtype."""
    targets = labels[:, 1:]
    scored = targets != -100
    logps = logits[:, :-1].log_softmax(-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * scored


def _exact_head(model: torch.nn.Module) -> None:
    """Replace the fused LM head TRL's trainer put on `model` by `_next_token_logps` in the
    model's dtype, returning the same `FusedCausalLMOutput` fields. Calls without
    `fused_lm_head` still go to TRL's wrapper, which passes them to the model's own forward."""
    trl_forward = model.forward

    def forward(*args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, **kwargs)
        logits = trl_forward(*args, **kwargs).logits
        log_probs = _next_token_logps(logits, labels)
        scored = labels[:, 1:] != -100
        logps = logits[:, :-1].log_softmax(-1)
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / scored.sum().clamp(min=1),
            log_probs=log_probs,
            entropy=-(logps.exp() * logps).sum(-1) * scored,
            mean_logits=logits[:, :-1].mean(-1).detach() * scored,
            is_top1=(logits[:, :-1].argmax(-1) == labels[:, 1:]) & scored,
            label_mask=scored)

    model.forward = forward


class _LogitsWatch(TorchDispatchMode):
    """The row counts (all dimensions but the last) of every op result whose last dimension is
    the vocabulary: the whole logits have batch x length rows, a head chunk batch x `CHUNK`.
    (The LM head's weight, transposed, has hidden-size rows.)"""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self) -> None:
        super().__init__()
        self.rows: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB:
                self.rows.add(t.numel() // VOCAB)
        return out


def _compile(fn):
    return torch.compile(fn, backend="memcompile", options=STREAM)


def _head_chunked(records, length: int) -> str:
    """The one streamed graph's head decision, checked to be in chunks shorter than `length`."""
    (record,) = records
    assert record.kind == "stream"
    head = record.stream_plan.head
    assert head is not None, [text for _, text in record.notes]
    assert head.chunk_size == CHUNK < length
    (reason,) = [d.reason for d in record.decisions
                 if d.kind == "chunked" and d.reason.startswith("head")]
    return reason


# ---- DPO ----------------------------------------------------------------------------------------

def _pairs(length: int) -> list[dict[str, list[int]]]:
    """Two preference pairs of different prompt and completion lengths, the longest row
    `length` tokens: TRL's collator pads the others on the right."""
    gen = torch.Generator().manual_seed(length)

    def tokens(n):
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    a, b = length // 3, length // 5
    return [{"prompt_ids": tokens(a), "chosen_ids": tokens(length - a),
             "rejected_ids": tokens(length - a - 3)},
            {"prompt_ids": tokens(b), "chosen_ids": tokens(length - b - 4),
             "rejected_ids": tokens(2)}]


def _dpo_trainer(policy, ref, tmp_path, *, exact: bool = True):
    """TRL's DPOTrainer with its default DPOConfig; its LM heads made exact unless told not to.
    The dataset is never read: the batches come from its collator."""
    config = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                           save_strategy="no")
    dataset = Dataset.from_dict({"prompt": ["t5"], "chosen": [" t6"], "rejected": [" t7"]})
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=dataset,
                             processing_class=_tokenizer())
    if exact:
        _exact_head(trainer.model)
        _exact_head(trainer.ref_model)
    return trainer


def test_the_float64_head_is_trls_fused_head(tmp_path):
    """`_exact_head` against the head TRL's trainer installs, on TRL's own batch: the same
    log-probabilities to float32 rounding (TRL's kernel computes its tiles in float32)."""
    trainer = _dpo_trainer(_llama(0), _llama(1), tmp_path, exact=False)
    batch = trainer.data_collator(_pairs(13))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
              "fused_lm_head": True}
    with torch.no_grad():
        fused = trainer.model(**inputs).log_probs
        _exact_head(trainer.model)
        exact = trainer.model(**inputs).log_probs
    assert fused.dtype == torch.float32 and exact.dtype == torch.float64
    assert (exact != 0).sum() == batch["completion_mask"][:, 1:].sum()
    assert relative_error(fused, exact) < 1e-6


@pytest.mark.parametrize("length", [9, 23])
def test_dpo_with_a_streamed_frozen_reference_matches_trl(tmp_path, length):
    """The DPO step users write: the frozen reference's `sequence_logps` of chosen and rejected,
    compiled with stream under `torch.no_grad()`, so its head is chunked too; then the policy's
    `dpo_loss`, streamed. Its loss and every gradient against `DPOTrainer.compute_loss` with
    TRL's default DPO (sigmoid, its beta), which runs the reference itself."""
    policy, ref = _llama(0), _llama(1)
    policy_mc, ref_mc = clone_model(policy), clone_model(ref).requires_grad_(False)
    trainer = _dpo_trainer(policy, ref, tmp_path)
    config = trainer.args
    assert config.loss_type == ["sigmoid"] and config.f_divergence_type == "reverse_kl"
    batch = trainer.data_collator(_pairs(length))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (4, length) and (mask == 0).any()
    # TRL scores the tokens its completion mask marks, each predicted by the position before it.
    labels = shift_labels(ids, attention_mask=batch["completion_mask"])

    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    eager = _LogitsWatch()
    with torch.no_grad(), eager:
        trl_ref = trainer.ref_model(input_ids=ids, attention_mask=mask, fused_lm_head=True,
                                    labels=ids.masked_fill(batch["completion_mask"] == 0, -100)
                                    ).log_probs.sum(-1)
    assert 4 * length in eager.rows  # the watch sees eager's whole logits

    torch._dynamo.reset()
    score = _compile(lambda i, m, l: sequence_logps(ref_mc(input_ids=i, attention_mask=m).logits,
                                                    l))
    step = _compile(lambda i, m, l, c, r: dpo_loss(
        policy_mc(input_ids=i, attention_mask=m).logits, l, c, r, beta=config.beta))
    watch = _LogitsWatch()
    with torch.no_grad(), recording() as ref_records, watch:
        ref_logps = score(ids, mask, labels)
    assert relative_error(ref_logps, trl_ref) <= FLOAT64_TOL
    reason = _head_chunked(ref_records, length)
    assert f"({4 * length}, {VOCAB}) never exists whole" in reason, reason
    assert 4 * CHUNK in watch.rows and 4 * length not in watch.rows, watch.rows

    watch = _LogitsWatch()
    with recording() as records, watch:
        loss = step(ids, mask, labels, *ref_logps.chunk(2))
        loss.backward()
    _head_chunked(records, length)
    assert 4 * CHUNK in watch.rows and 4 * length not in watch.rows, watch.rows
    err, where = worst_error(loss.detach(), trl_loss.detach(), policy_mc, trainer.model)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"


# ---- GRPO ---------------------------------------------------------------------------------------

def _grpo_trainer(policy, tmp_path, **config):
    """TRL's GRPOTrainer on `policy`, its LM head made exact. The policy is saved and loaded back
    by path: with `beta` set, the trainer loads a reference from the policy's path (unused here:
    the loss takes the reference's log-probabilities as an input, as TRL's generation step hands
    them over)."""
    path = tmp_path / "policy"
    policy.save_pretrained(path)
    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                          save_strategy="no", per_device_train_batch_size=4, num_generations=2,
                          model_init_kwargs={"dtype": torch.float64}, **config)
    trainer = trl.GRPOTrainer(model=str(path), args=args,
                              reward_funcs=lambda completions, **_: [0.0] * len(completions),
                              train_dataset=Dataset.from_dict({"prompt": ["t5"] * 4}),
                              processing_class=_tokenizer())
    _norms_in_model_dtype(trainer.model)
    _exact_head(trainer.model)
    # One micro-batch per optimizer step, as the training loop sets it before the loss.
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _generation(prompt: int, completion: int, seed: int) -> dict[str, torch.Tensor]:
    """Four generations as TRL's generation step hands them to the loss: prompts padded on the
    left, completions on the right (after their end)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, VOCAB, (4, prompt), generator=gen)
    completion_ids = torch.randint(3, VOCAB, (4, completion), generator=gen)
    positions = torch.arange(prompt)
    prompt_mask = (positions >= torch.tensor([0, 2, 0, prompt - 2])[:, None]).long()
    ends = torch.tensor([completion, completion - 3, 2, completion - 1])
    completion_mask = (torch.arange(completion) < ends[:, None]).long()
    return {"prompt_ids": prompt_ids.masked_fill(prompt_mask == 0, 0), "prompt_mask": prompt_mask,
            "completion_ids": completion_ids.masked_fill(completion_mask == 0, 0),
            "completion_mask": completion_mask}


def _memcompile_layout(inputs):
    """TRL's generation batch as one sequence: ids, attention mask, and labels aligned with the
    logits that score the completions only."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    labels = shift_labels(ids, attention_mask=torch.cat(
        [torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], 1))
    return ids, mask, labels


def _completion_logps(model, inputs) -> torch.Tensor:
    """The completions' per-token log-probabilities under `model`, `(batch, completion)` (the
    layout of TRL's old and reference log-probabilities), zero after each completion's end."""
    ids, mask, labels = _memcompile_layout(inputs)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # Position t scores token t + 1: the completion's tokens are scored from the prompt's last.
    return (picked * (labels != -100))[:, -inputs["completion_ids"].shape[1] - 1:-1]


@pytest.mark.parametrize("prompt,completion,on_policy", [(5, 6, False), (7, 15, True)])
def test_grpo_with_trls_default_loss_and_a_kl_term_matches_trl(tmp_path, prompt, completion,
                                                              on_policy):
    """GRPO as TRL 1.16 configures it by default (`loss_type="dapo"`: the scored tokens' sum over
    the batch divided by their count; the KL term weighted by the ratio) with a KL coefficient
    set, per-sequence advantages, and the reference's per-token log-probabilities. Off-policy
    (old log-probs a little away from the policy's, so some ratios clip) and on-policy (TRL's
    one step per generation: old log-probs are the policy's own, detached)."""
    policy, ref = _llama(0), _llama(1)
    policy_mc = clone_model(policy)
    trainer = _grpo_trainer(policy, tmp_path, beta=0.04)
    config = trainer.args
    inputs = _generation(prompt, completion, seed=prompt)
    gen = torch.Generator().manual_seed(completion)
    ref_logps = _completion_logps(ref, inputs)
    inputs.update(advantages=torch.randn(4, dtype=torch.float64, generator=gen),
                  ref_per_token_logps=ref_logps,
                  num_items_in_batch=inputs["completion_mask"].sum())
    old = None
    if not on_policy:
        old = _completion_logps(policy_mc, inputs) + 0.3 * torch.randn(
            4, completion, dtype=torch.float64, generator=gen)
        inputs["old_per_token_logps"] = old

    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    # The same in memcompile's layout: one sequence, labels aligned with the logits, and per-token
    # values aligned with the labels (anything where a label is -100).
    ids, mask, labels = _memcompile_layout(inputs)
    assert (labels != -100).sum() == inputs["num_items_in_batch"]

    def aligned(values):
        out = -5 * torch.rand(ids.shape, dtype=torch.float64, generator=gen)
        out[:, prompt - 1:prompt + completion - 1] = values
        return out

    torch._dynamo.reset()
    step = _compile(lambda i, m, l, a, o, r: grpo_loss(
        policy_mc(input_ids=i, attention_mask=m).logits, l, a, o, r, beta=config.beta,
        epsilon=config.epsilon, loss_type=config.loss_type,
        kl_bias_correction=config.use_bias_correction_kl))
    assert config.epsilon_high is None and config.delta is None
    assert config.importance_sampling_level == "token" and config.temperature == 1.0
    watch = _LogitsWatch()
    with recording() as records, watch:
        loss = step(ids, mask, labels, inputs["advantages"], None if old is None else aligned(old),
                    aligned(ref_logps))
        loss.backward()
    _head_chunked(records, prompt + completion)
    assert 4 * CHUNK in watch.rows and 4 * (prompt + completion) not in watch.rows, watch.rows
    err, where = worst_error(loss.detach(), trl_loss.detach(), policy_mc, trainer.model)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"


def test_grpo_loss_defaults_are_trls_grpo_loss_type(tmp_path):
    """`grpo_loss`'s own defaults (`loss_type="grpo"`, each completion's token mean, beta 0.04,
    a KL term not weighted by the ratio) are TRL's `loss_type="grpo"` with that beta and
    `use_bias_correction_kl=False`; eager, against the trainer."""
    policy = _llama(0)
    policy_mc = clone_model(policy)
    trainer = _grpo_trainer(policy, tmp_path, beta=0.04, loss_type="grpo",
                            use_bias_correction_kl=False)
    prompt, completion = 4, 9
    inputs = _generation(prompt, completion, seed=3)
    gen = torch.Generator().manual_seed(4)
    ref_logps = _completion_logps(_llama(1), inputs)
    old = _completion_logps(policy_mc, inputs) + 0.3 * torch.randn(
        4, completion, dtype=torch.float64, generator=gen)
    inputs.update(advantages=torch.randn(4, dtype=torch.float64, generator=gen),
                  ref_per_token_logps=ref_logps, old_per_token_logps=old)
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    ids, mask, labels = _memcompile_layout(inputs)
    full_old, full_ref = (torch.zeros(ids.shape, dtype=torch.float64) for _ in range(2))
    full_old[:, prompt - 1:prompt + completion - 1] = old
    full_ref[:, prompt - 1:prompt + completion - 1] = ref_logps
    loss = grpo_loss(policy_mc(input_ids=ids, attention_mask=mask).logits, labels,
                     inputs["advantages"], full_old, full_ref)
    loss.backward()
    err, where = worst_error(loss.detach(), trl_loss.detach(), policy_mc, trainer.model)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"


def test_grpo_loss_refuses_an_unknown_loss_type():
    logits = torch.zeros(1, 3, VOCAB)
    with pytest.raises(ValueError, match=r"unknown loss_type 'bnpo'; valid: \['grpo', 'dapo'\]"):
        grpo_loss(logits, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1), None, beta=0.0,
                  loss_type="bnpo")
