"""PerContrast: PIR against a hand computation, and identical response ids in both passes."""
import torch

from percontrast.encoding import PairedCollator, PromptBuilder
from percontrast.pir import pir, token_entropy, token_logprobs
from percontrast.scoring import score_batch


def test_pir_is_difference_of_logprobs():
    a = torch.tensor([[-1.0, -2.0, -0.5]])
    b = torch.tensor([[-1.5, -1.0, -0.5]])
    assert torch.equal(pir(a, b), torch.tensor([[0.5, -1.0, 0.0]]))


def test_token_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    t = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, t[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, t), ref, rtol=0, atol=1e-6)


def test_entropy_uniform_is_log_v():
    assert abs(token_entropy(torch.zeros(1, 1, 7)).item() - torch.log(torch.tensor(7.0)).item()) < 1e-6


def _hand_logprobs(model, prompt, response):
    """Straightforward reference: one unpadded sequence, full logits, log_softmax."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    P = len(prompt)
    return torch.stack([logp[P - 1 + i, tok] for i, tok in enumerate(response)])


def test_pir_matches_hand_computation_on_tiny_model(tiny, sample_train, email_task):
    model, tok = tiny
    builder = PromptBuilder(tok, email_task, k=2)
    enc = [builder.encode(r) for r in sample_train[:3]]
    batch = PairedCollator(tok.pad_token_id)(enc)
    scores = score_batch(model, batch)
    for b, e in enumerate(enc):
        n = len(e["response"])
        want = _hand_logprobs(model, e["prompt_with"], e["response"]) - \
            _hand_logprobs(model, e["prompt_without"], e["response"])
        torch.testing.assert_close(scores.pir[b, :n].double(), want, rtol=0, atol=2e-5)
        assert scores.mask[b, :n].all() and not scores.mask[b, n:].any()


def test_response_ids_identical_in_both_passes(tiny, email_task):
    _, tok = tiny
    builder = PromptBuilder(tok, email_task, k=1)
    # A response starting with spaces merges with the chat template's trailing "\n" under
    # joint tokenization; we tokenize the response on its own and concatenate ids.
    response = "  spaced reply"
    rec = {"id": "x", "input": "Write a reply", "output": response,
           "profile": [{"title": "t", "text": "some text"}]}
    e = builder.encode(rec)
    alone = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert e["response"] == alone
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                       add_generation_prompt=True)
    joint = tok(rendered + response, add_special_tokens=False)["input_ids"]
    prompt_only = tok(rendered, add_special_tokens=False)["input_ids"]
    assert joint != prompt_only + alone[:-1], "fixture no longer exercises a boundary merge"
    batch = PairedCollator(tok.pad_token_id)([e])
    P, Pc, R = int(batch["resp_start"]), int(batch["cf_resp_start"]), len(alone)
    assert batch["input_ids"][0, P:P + R].tolist() == alone
    assert batch["cf_input_ids"][0, Pc:Pc + R].tolist() == alone
    assert batch["response_ids"][0].tolist() == alone


def test_prompts_differ_only_in_profile(tiny, email_task, sample_train):
    _, tok = tiny
    from percontrast.prompts import counterfactual_prompt, personalized_prompt
    r = sample_train[0]
    items = r["profile"][:2]
    with_p = personalized_prompt(email_task, items, r["input"])
    without = counterfactual_prompt(email_task, r["input"])
    assert with_p.endswith(r["input"]) and without == r["input"]
    assert items[0]["text"] in with_p and items[0]["text"] not in without
